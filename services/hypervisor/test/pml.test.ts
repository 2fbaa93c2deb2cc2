/**
 * x86_64 and Intel PML: the exact PML-full arithmetic, drains at exits and at
 * GET, the ring's PML reserve, the EPT view, the selftest invariant in every
 * x86 mechanism (and the bugs it catches), and x86's capabilities beside
 * arm64's; the mechanism file on its own, without a server.
 */
import assert from "node:assert/strict";
import { status } from "@grpc/grpc-js";
import { after, before, describe, test } from "node:test";
import { Arch, Capability, MemslotFlag } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { GiB, MiB, startHypervisor, type RunningHypervisor } from "../../../tests/hypervisor-harness.js";
import { rejects } from "../../../tests/grpc-assert.js";
import { collectDirtyLog, runSelftest } from "../../../tests/selftest.js";
import { DEFAULT_COSTS } from "../model/cost-model.js";
import { Pml, PML_ENTRIES } from "../model/pml.js";
import { Tlb } from "../model/tlb.js";
import { Vcpu } from "../model/vcpu.js";
import { IDLE, WorkloadGen } from "../model/workload.js";

const BASE = BigInt(GiB);
const LOG = MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES;
const X86 = { arch: Arch.ARCH_X86_64 };
const X86_PML = { arch: Arch.ARCH_X86_64, pml: true };

describe("Intel PML on its own", () => {
  test("512 entries; the write that finds the buffer full exits, drains it oldest first, and is retried into it", () => {
    const marked: number[] = [];
    const vcpu = new Vcpu(0, new Tlb(16), new WorkloadGen(IDLE, 0, 1n, 0, 1), null);
    const pml = new Pml({ vcpus: [vcpu], injected: { skipHwLogDrain: false }, markGfnDirty: (_v, gfn) => (marked.push(gfn), true) }, 1, DEFAULT_COSTS);
    for (let g = 0; g < PML_ENTRIES; g++) assert.equal(pml.recorded(vcpu, null as never, g, g), DEFAULT_COSTS.pmlLogNs);
    assert.deepEqual([vcpu.total.pmlFullExits, marked.length], [0, 0]);
    assert.equal(pml.recorded(vcpu, null as never, 512, 512), DEFAULT_COSTS.pmlLogNs + DEFAULT_COSTS.pmlFullExitNs + 512 * DEFAULT_COSTS.pmlDrainEntryNs);
    assert.deepEqual([vcpu.total.pmlFullExits, pml.used[0]], [1, 1]);
    assert.deepEqual(marked, Array.from({ length: 512 }, (_, g) => g));
    pml.vcpuExit(vcpu);
    assert.deepEqual([pml.used[0], marked.at(-1)], [0, 512], "any exit drains");
  });
});

describe("x86_64 VMs over gRPC", () => {
  let h: RunningHypervisor;
  before(async () => (h = await startHypervisor()));
  after(() => h.close());
  const c = () => h.client;
  const writePages = (vm: string, from: number, n: number) =>
    c().guestWrite({ vm, writes: Array.from({ length: n }, (_, i) => ({ vcpu: 0, gpa: BASE + BigInt(from + i) * 4096n, value: BigInt(i + 1) })) });
  const vcpu0 = async (vm: string) => (await c().getVm({ vm })).vm!.vcpus[0];

  test("a pass over N clean pages takes exactly ceil(N / 512) - 1 PML-full exits, and GET finds every page", async () => {
    await c().createVm({ vm: "n", vcpus: 1, ...X86_PML, memslots: [{ slot: 0, guestPhysAddr: BASE, memorySize: BigInt(8 * MiB), flags: LOG }] });
    const first = await writePages("n", 0, 2048);
    assert.ok(first.results.every((r) => r.fault !== 0 && r.logged), "never-mapped pages fault first (EPT violations)");
    await c().getDirtyLog({ vm: "n", slot: 0 }); // re-arm: D bits cleared
    const tr = await c().translateGpa({ vm: "n", gpa: BASE });
    assert.deepEqual([tr.writable, tr.dirty, tr.accessed], [true, false, true], "W = 1, D = 0: PML re-arms by clearing D, not W");
    let exits = 0n;
    for (const n of [1, 512, 513, 1024, 1025, 2048]) {
      const r = await writePages("n", 0, n);
      assert.ok(r.results.every((x) => x.fault === 0 && !x.logged), "D-bit updates: no EPT violation, not logged by KVM's fault path");
      const v = await vcpu0("n");
      assert.equal(v.pmlFullExits - exits, BigInt(Math.ceil(n / 512) - 1), `N = ${n}`);
      exits = v.pmlFullExits;
      const g = await c().getDirtyLog({ vm: "n", slot: 0 });
      assert.equal(g.dirtyPages, BigInt(n), `N = ${n}: every page found`);
      assert.equal((await vcpu0("n")).pmlEntries, 0, "GET drained the buffer");
    }
    assert.equal((await c().translateGpa({ vm: "n", gpa: BASE + 4096n })).dirty, false);
    await writePages("n", 1, 1);
    assert.equal((await c().translateGpa({ vm: "n", gpa: BASE + 4096n })).dirty, true);
  });

  test("KickVcpus: every running vCPU exits once, which drains its PML buffer into its ring (QEMU kicks them before it collects the rings)", async () => {
    await c().createVm({ vm: "kick", vcpus: 2, ...X86_PML, dirtyRing: { capability: Capability.CAPABILITY_DIRTY_LOG_RING, bytes: 4096n * 16n }, memslots: [{ slot: 0, guestPhysAddr: BASE, memorySize: BigInt(8 * MiB), flags: LOG }] });
    await c().pauseVm({ vm: "kick", vcpus: [1] });
    await writePages("kick", 0, 10); // first touches: EPT violations, pushed by the fault path
    assert.equal((await c().harvestDirtyRing({ vm: "kick", vcpu: 0 })).count, 10);
    await c().resetDirtyRings({ vm: "kick" }); // re-armed by clearing D bits
    await writePages("kick", 0, 10);
    let v = await vcpu0("kick");
    assert.deepEqual([v.pmlEntries, v.dirtyRingEntries], [10, 0], "the rewrites sit in the PML buffer");
    const k = await c().kickVcpus({ vm: "kick" });
    assert.equal(k.kicked, 1, "the paused vCPU is not in the guest");
    assert.ok(k.hostNs > 0n);
    const after = (await c().getVm({ vm: "kick" })).vm!.vcpus;
    v = after[0];
    assert.deepEqual([v.pmlEntries, v.dirtyRingEntries, v.kicks], [0, 10, 1n], "the exit drained the buffer into the ring");
    assert.equal(after[1].kicks, 0n);
  });

  test("with PML the ring reserves 512 more entries: soft limit entries - 64 - 512, and a 4 KiB ring is too small", async () => {
    const r = await c().createVm({ vm: "ring", vcpus: 1, ...X86_PML, dirtyRing: { capability: Capability.CAPABILITY_DIRTY_LOG_RING, bytes: 4096n * 16n } });
    assert.equal(r.vm!.dirtyRingSoftLimit, 4096 - 64 - 512);
    const plain = await c().createVm({ vm: "ring-wp", vcpus: 1, ...X86, dirtyRing: { capability: Capability.CAPABILITY_DIRTY_LOG_RING, bytes: 4096n * 16n } });
    assert.equal(plain.vm!.dirtyRingSoftLimit, 4096 - 64, "x86 without PML, and x86 offers plain DIRTY_LOG_RING (TSO)");
    await rejects(
      c().createVm({ vm: "tiny", vcpus: 1, ...X86_PML, dirtyRing: { capability: Capability.CAPABILITY_DIRTY_LOG_RING, bytes: 4096n } }),
      status.INVALID_ARGUMENT,
      /smaller than one page or the 576 reserved entries.*EINVAL/,
    );
  });

  test("the bugs are caught on x86 too: a skipped TLB flush, PML buffers not drained before the log is read", async () => {
    const noflush = await runSelftest(c(), { vm: "st-x86-noflush", collect: collectDirtyLog, create: X86, inject: { skipTlbFlushAfterWriteProtect: true } });
    assert.ok(noflush.lost > 0);
    const nodrain = await runSelftest(c(), { vm: "st-x86-nodrain", collect: collectDirtyLog, create: X86_PML, inject: { skipHwLogDrain: true } });
    assert.ok(nodrain.lost > 0, `${nodrain.lost} pages lost`);
  });

  test("each architecture answers for its own capabilities and interfaces, with KVM's errno", async () => {
    await c().createVm({ vm: "x", vcpus: 1, ...X86, memslots: [{ slot: 0, guestPhysAddr: BASE, memorySize: BigInt(MiB) }] });
    for (const cap of [Capability.CAPABILITY_ARM_HW_DIRTY_LOG, Capability.CAPABILITY_ARM_HW_DIRTY_STATE_TRACK, Capability.CAPABILITY_ARM_PAGE_TRACKING_DEVICE]) {
      assert.equal((await c().checkExtension({ vm: "x", capability: cap })).value, 0n);
      await rejects(c().enableCap({ vm: "x", capability: cap, args: [1n, 1n] }), status.INVALID_ARGUMENT, /arm64's; VM x is x86_64.*EINVAL/);
    }
    assert.ok((await c().checkExtension({ vm: "x", capability: Capability.CAPABILITY_DIRTY_LOG_RING })).value > 0n);
    await rejects(c().createVm({ vm: "arm-pml", vcpus: 1, pml: true }), status.INVALID_ARGUMENT, /PML is Intel's \(x86_64\).*EINVAL/);
    await c().createVm({ vm: "arm", vcpus: 1, memslots: [{ slot: 0, guestPhysAddr: BASE, memorySize: BigInt(MiB) }] });
    await rejects(c().addWriteTracking({ vm: "arm", gfn: BASE / 4096n }), status.UNIMPLEMENTED, /write tracking is x86's.*EOPNOTSUPP/);
    const x = await c().addWriteTracking({ vm: "x", gfn: BASE / 4096n });
    assert.equal(x.count, 1, "write tracking works on x86");
    const dirty = await c().getVm({ vm: "x" });
    assert.equal(dirty.vm!.arch, Arch.ARCH_X86_64);
  });
});
