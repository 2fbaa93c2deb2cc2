#!/usr/bin/python3
"""A hypervisor client in another language: Python, with stubs generated from
the buf module by protoc and grpc_python_plugin (see README.md beside this).

It creates a VM, turns dirty logging on, and runs a few collections (GET_DIRTY_LOG),
checking the invariant a VMM relies on: every page the guest wrote since the
previous collection is in the bitmap, and nothing else is (the guest writes
only through GuestWrite here). Exits 0 when it holds, 1 with the first page
that breaks it.

usage: dirty_log_check.py HOST:PORT [--rounds N]
"""
import argparse
import random
import sys

import grpc

from dirtytrack.hypervisor.v1 import hypervisor_pb2 as pb
from dirtytrack.hypervisor.v1 import hypervisor_pb2_grpc as rpc

GIB = 1 << 30
PAGES = 16384  # a 64 MiB slot
LOG_DIRTY_PAGES = pb.MEMSLOT_FLAG_LOG_DIRTY_PAGES


def dirty_pages(bitmap: bytes) -> set:
    return {8 * i + b for i, byte in enumerate(bitmap) for b in range(8) if byte >> b & 1}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("address", help="the hypervisor, HOST:PORT")
    ap.add_argument("--rounds", type=int, default=5, help="collections to check (default 5)")
    ap.add_argument("--vm", default="python-check", help="the VM to create (removed at the end)")
    args = ap.parse_args()

    with grpc.insecure_channel(args.address) as channel:
        hv = rpc.HypervisorServiceStub(channel)
        slot = pb.Memslot(slot=0, guest_phys_addr=GIB, memory_size=PAGES * 4096, flags=LOG_DIRTY_PAGES)
        hv.CreateVm(pb.CreateVmRequest(vm=args.vm, vcpus=2, memslots=[slot]), timeout=10)
        try:
            hv.GetDirtyLog(pb.GetDirtyLogRequest(vm=args.vm, slot=0), timeout=10)  # start from a clean log
            rng = random.Random(7)
            for n in range(args.rounds):
                wrote = {rng.randrange(PAGES) for _ in range(500)}
                ops = [pb.GuestWriteOp(vcpu=i % 2, gpa=GIB + p * 4096, value=n + 1) for i, p in enumerate(sorted(wrote))]
                hv.GuestWrite(pb.GuestWriteRequest(vm=args.vm, writes=ops), timeout=10)
                got = dirty_pages(hv.GetDirtyLog(pb.GetDirtyLogRequest(vm=args.vm, slot=0), timeout=10).bitmap)
                if got != wrote:
                    lost, extra = sorted(wrote - got), sorted(got - wrote)
                    print(f"collection {n}: {len(lost)} written pages missing (first {lost[:1]}), {len(extra)} pages never written", file=sys.stderr)
                    return 1
                print(f"collection {n}: {len(got)} dirty pages, exactly the {len(wrote)} written")
            # Nothing written since the last collection: nothing dirty.
            left = dirty_pages(hv.GetDirtyLog(pb.GetDirtyLogRequest(vm=args.vm, slot=0), timeout=10).bitmap)
            if left:
                print(f"an idle guest left {len(left)} pages dirty", file=sys.stderr)
                return 1
            print("invariant held: every written page collected once, nothing else")
            return 0
        except grpc.RpcError as e:
            print(f"{e.code().name}: {e.details()}", file=sys.stderr)
            return 1
        finally:
            hv.DestroyVm(pb.DestroyVmRequest(vm=args.vm), timeout=10)


if __name__ == "__main__":
    sys.exit(main())
