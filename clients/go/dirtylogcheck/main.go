// Command dirtylogcheck is a hypervisor client in another language: Go, with
// code generated from the buf module by protoc-gen-go and protoc-gen-go-grpc
// with no flags (the protos carry go_package; see README.md beside this).
//
// It creates a VM with dirty logging on and runs a few collections
// (GET_DIRTY_LOG), checking the invariant a VMM relies on: every page the
// guest wrote since the previous collection is in the bitmap, and nothing
// else is. Exits 0 when it holds, 1 with the first page that breaks it.
//
// usage: dirtylogcheck [-rounds N] [-vm NAME] HOST:PORT
package main

import (
	"context"
	"flag"
	"fmt"
	"math/rand"
	"os"
	"sort"
	"time"

	hv "dirtytrack/gen/go/dirtytrack/hypervisor/v1"

	"google.golang.org/grpc"
)

const (
	gib   = 1 << 30
	pages = 16384 // a 64 MiB slot
)

func dirtyPages(bitmap []byte) map[uint64]bool {
	set := map[uint64]bool{}
	for i, b := range bitmap {
		for bit := 0; bit < 8; bit++ {
			if b>>bit&1 == 1 {
				set[uint64(8*i+bit)] = true
			}
		}
	}
	return set
}

func diff(a, b map[uint64]bool) []uint64 {
	var out []uint64
	for p := range a {
		if !b[p] {
			out = append(out, p)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

func run(ctx context.Context, c hv.HypervisorServiceClient, vm string, rounds int) error {
	slot := &hv.Memslot{Slot: 0, GuestPhysAddr: gib, MemorySize: pages * 4096, Flags: uint32(hv.MemslotFlag_MEMSLOT_FLAG_LOG_DIRTY_PAGES)}
	if _, err := c.CreateVm(ctx, &hv.CreateVmRequest{Vm: vm, Vcpus: 2, Memslots: []*hv.Memslot{slot}}); err != nil {
		return err
	}
	defer c.DestroyVm(ctx, &hv.DestroyVmRequest{Vm: vm})
	collect := func() (map[uint64]bool, error) {
		r, err := c.GetDirtyLog(ctx, &hv.GetDirtyLogRequest{Vm: vm, Slot: 0})
		if err != nil {
			return nil, err
		}
		return dirtyPages(r.Bitmap), nil
	}
	if _, err := collect(); err != nil { // start from a clean log
		return err
	}
	rng := rand.New(rand.NewSource(7))
	for n := 0; n < rounds; n++ {
		wrote := map[uint64]bool{}
		for i := 0; i < 500; i++ {
			wrote[uint64(rng.Intn(pages))] = true
		}
		var ops []*hv.GuestWriteOp
		for p := range wrote {
			ops = append(ops, &hv.GuestWriteOp{Vcpu: uint32(len(ops) % 2), Gpa: gib + p*4096, Value: uint64(n + 1)})
		}
		if _, err := c.GuestWrite(ctx, &hv.GuestWriteRequest{Vm: vm, Writes: ops}); err != nil {
			return err
		}
		got, err := collect()
		if err != nil {
			return err
		}
		if lost, extra := diff(wrote, got), diff(got, wrote); len(lost) > 0 || len(extra) > 0 {
			return fmt.Errorf("collection %d: %d written pages missing (first %v), %d pages never written", n, len(lost), lost[:min(1, len(lost))], len(extra))
		}
		fmt.Printf("collection %d: %d dirty pages, exactly the %d written\n", n, len(got), len(wrote))
	}
	// Nothing written since the last collection: nothing dirty.
	left, err := collect()
	if err != nil {
		return err
	}
	if len(left) > 0 {
		return fmt.Errorf("an idle guest left %d pages dirty", len(left))
	}
	fmt.Println("invariant held: every written page collected once, nothing else")
	return nil
}

func min(a, b int) int {
	if a < b {
		return a
	}
	return b
}

func main() {
	rounds := flag.Int("rounds", 5, "collections to check")
	vm := flag.String("vm", "go-check", "the VM to create (removed at the end)")
	flag.Usage = func() {
		fmt.Fprintf(os.Stderr, "usage: dirtylogcheck [-rounds N] [-vm NAME] HOST:PORT\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() != 1 {
		flag.Usage()
		os.Exit(2)
	}
	conn, err := grpc.Dial(flag.Arg(0), grpc.WithInsecure())
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := run(ctx, hv.NewHypervisorServiceClient(conn), *vm, *rounds); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
