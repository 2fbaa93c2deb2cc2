/**
 * FEAT_HDBSS (the KVM series v3): per-vCPU buffers of hardware dirty-state
 * updates, the exact buffer-full arithmetic, flushes at GET and at vcpu_put,
 * the selftest invariant, bad input by status code, a verified migration;
 * and the mechanism file on its own, without a server.
 */
import assert from "node:assert/strict";
import { status } from "@grpc/grpc-js";
import { after, before, describe, test } from "node:test";
import { Capability, MemslotFlag, WorkloadPattern } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { migrate } from "../../../clients/migration-controller/migrate.js";
import { bit, GiB, MiB, startHypervisor, type RunningHypervisor } from "../../../tests/hypervisor-harness.js";
import { rejects } from "../../../tests/grpc-assert.js";
import { collectDirtyLog, runSelftest } from "../../../tests/selftest.js";
import { DEFAULT_COSTS } from "../model/cost-model.js";
import { Hdbss, hdbssEntries } from "../model/hdbss.js";
import { Tlb } from "../model/tlb.js";
import { Vcpu } from "../model/vcpu.js";
import { WorkloadGen, IDLE } from "../model/workload.js";

const HDBSS = Capability.CAPABILITY_ARM_HW_DIRTY_STATE_TRACK;
const BASE = BigInt(GiB);
const LOG = MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES;

describe("FEAT_HDBSS on its own", () => {
  test("a buffer of 4 KiB x 2^order; a full one faults, flushes into the log oldest first, and takes the retried entry", () => {
    assert.deepEqual([0, 9].map(hdbssEntries), [512, 262_144]);
    const marked: number[] = [];
    const vcpu = new Vcpu(0, new Tlb(16), new WorkloadGen(IDLE, 0, 1n, 0, 1), null);
    const hd = new Hdbss({ vcpus: [vcpu], injected: { skipHwLogDrain: false }, markGfnDirty: (_v, gfn) => (marked.push(gfn), true) }, 1, 0, DEFAULT_COSTS);
    const slot = null as never;
    let faultCost = 0;
    for (let g = 0; g < 512; g++) faultCost += hd.recorded(vcpu, slot, g, 2 ** 40 + g) - DEFAULT_COSTS.hdbssEntryNs;
    assert.deepEqual([faultCost, vcpu.total.hdbssFullFaults, hd.used[0], marked.length], [0, 0, 512, 0]);
    const cost = hd.recorded(vcpu, slot, 512, 2 ** 40 + 512);
    assert.equal(vcpu.total.hdbssFullFaults, 1);
    assert.equal(cost, DEFAULT_COSTS.hdbssEntryNs + DEFAULT_COSTS.hdbssFullFaultNs + 512 * DEFAULT_COSTS.hdbssFlushEntryNs);
    assert.deepEqual(marked, Array.from({ length: 512 }, (_, g) => 2 ** 40 + g), "IPAs above 4 GiB decode exactly, in order");
    assert.equal(hd.used[0], 1, "the retried update is the buffer's first entry");
    hd.vcpuPut(vcpu);
    assert.deepEqual([hd.used[0], marked.at(-1)], [0, 2 ** 40 + 512]);
  });
});

describe("FEAT_HDBSS over gRPC", () => {
  let h: RunningHypervisor;
  before(async () => (h = await startHypervisor()));
  after(() => h.close());
  const c = () => h.client;
  const on = (vm: string, order = 0n) => c().enableCap({ vm, capability: HDBSS, args: [order, 1n] }).then(() => undefined);
  const writePages = (vm: string, from: number, n: number) =>
    c().guestWrite({ vm, writes: Array.from({ length: n }, (_, i) => ({ vcpu: 0, gpa: BASE + BigInt(from + i) * 4096n, value: BigInt(i + 1) })) });
  const vcpu0 = async (vm: string) => (await c().getVm({ vm })).vm!.vcpus[0];

  test("a pass over N writable-clean pages takes exactly ceil(N / 512) - 1 buffer-full faults, and GET finds every page", async () => {
    await c().createVm({ vm: "n", vcpus: 1, memslots: [{ slot: 0, guestPhysAddr: BASE, memorySize: BigInt(8 * MiB) }] });
    await on("n");
    await c().setUserMemoryRegion({ vm: "n", memslot: { slot: 0, guestPhysAddr: BASE, memorySize: BigInt(8 * MiB), flags: LOG } });
    assert.equal((await c().getVm({ vm: "n" })).vm!.hdbssBufferEntries, 512);
    // First writes fault and are logged by KVM, which maps the pages with DBM.
    const first = await writePages("n", 0, 2048);
    assert.ok(first.results.every((r) => r.fault !== 0 && r.logged));
    await c().getDirtyLog({ vm: "n", slot: 0 }); // write protection: writable-clean from here on
    let faults = 0n;
    for (const n of [1, 512, 513, 1024, 1025, 2048]) {
      const r = await writePages("n", 0, n);
      assert.ok(r.results.every((x) => x.fault === 0 && !x.logged), "hardware updates: no fault, not logged by KVM");
      const v = await vcpu0("n");
      assert.equal(v.hdbssFullFaults - faults, BigInt(Math.ceil(n / 512) - 1), `N = ${n}`);
      faults = v.hdbssFullFaults;
      const g = await c().getDirtyLog({ vm: "n", slot: 0 });
      assert.equal(g.dirtyPages, BigInt(n), `N = ${n}: every page found`);
      assert.equal((await vcpu0("n")).hdbssEntries, 0, "GET flushed the buffer");
    }
  });

  test("a pause (vcpu_put) flushes the vCPU's buffer into the log", async () => {
    await c().createVm({ vm: "p", vcpus: 1, memslots: [{ slot: 0, guestPhysAddr: BASE, memorySize: BigInt(MiB) }] });
    await on("p", 1n);
    await c().setUserMemoryRegion({ vm: "p", memslot: { slot: 0, guestPhysAddr: BASE, memorySize: BigInt(MiB), flags: LOG } });
    await writePages("p", 0, 10);
    await c().getDirtyLog({ vm: "p", slot: 0 });
    await writePages("p", 3, 2);
    assert.equal((await vcpu0("p")).hdbssEntries, 2);
    await c().pauseVm({ vm: "p" });
    assert.equal((await vcpu0("p")).hdbssEntries, 0);
    const bm = h.hypervisor.vm("p").slots.get(0)!.dirtyBitmap!;
    assert.deepEqual([3, 4, 5].map((p) => (bm[0] >>> p) & 1), [1, 1, 0], "in the bitmap before any GET");
  });

  test("HDBSS buffers not drained before the log is read lose pages: the invariant catches it", async () => {
    const r = await runSelftest(c(), {
      vm: "st-hdbss-noflush",
      collect: collectDirtyLog,
      beforeLogging: (cl, vm) => cl.enableCap({ vm, capability: HDBSS, args: [3n, 1n] }).then(() => undefined),
      inject: { skipHwLogDrain: true },
    });
    assert.ok(r.lost > 0, `${r.lost} pages lost`);
  });

  test("bad input by status code and errno; turning it off keeps what the buffers held", async () => {
    await c().createVm({ vm: "ringed", vcpus: 1, dirtyRing: { capability: Capability.CAPABILITY_DIRTY_LOG_RING_ACQ_REL, bytes: 65536n } });
    await rejects(c().enableCap({ vm: "ringed", capability: HDBSS, args: [0n, 1n] }), status.FAILED_PRECONDITION, /dirty rings.*EINVAL/);
    await c().createVm({ vm: "e", vcpus: 1, memslots: [{ slot: 0, guestPhysAddr: BASE, memorySize: BigInt(MiB) }] });
    await rejects(c().enableCap({ vm: "e", capability: HDBSS, args: [10n, 1n] }), status.INVALID_ARGUMENT, /order 10 must be in \[0, 9\].*EINVAL/);
    await rejects(c().enableCap({ vm: "e", capability: HDBSS, args: [0n, 2n] }), status.INVALID_ARGUMENT, /args\[1\] 1 \(on\) or 0 \(off\)/);
    await c().enableCap({ vm: "e", capability: Capability.CAPABILITY_ARM_HW_DIRTY_LOG, args: [1n] });
    await rejects(c().enableCap({ vm: "e", capability: HDBSS, args: [0n, 1n] }), status.FAILED_PRECONDITION, /hardware dirty logging \(DBM scan\) already owns.*EBUSY/);
    await c().enableCap({ vm: "e", capability: Capability.CAPABILITY_ARM_HW_DIRTY_LOG, args: [0n] });
    await on("e", 2n);
    await rejects(on("e", 3n), status.FAILED_PRECONDITION, /on with order 2; turn it off first.*EBUSY/);
    await c().setUserMemoryRegion({ vm: "e", memslot: { slot: 0, guestPhysAddr: BASE, memorySize: BigInt(MiB), flags: LOG } });
    await writePages("e", 0, 4);
    await c().getDirtyLog({ vm: "e", slot: 0 });
    await writePages("e", 1, 1);
    await c().enableCap({ vm: "e", capability: HDBSS, args: [0n, 0n] });
    const g = await c().getDirtyLog({ vm: "e", slot: 0 });
    assert.deepEqual([bit(g.bitmap, 1), g.dirtyPages], [1, 1n], "the buffered page reached the log when HDBSS went off");
    const after = await writePages("e", 2, 1);
    assert.notEqual(after.results[0].fault, 0, "back to write protection");
  });

  test("the buffers count in the memory budget", async () => {
    const small = await startHypervisor({ memoryBudgetBytes: 8 * MiB });
    try {
      await small.client.createVm({ vm: "b", vcpus: 8 });
      await rejects(small.client.enableCap({ vm: "b", capability: HDBSS, args: [9n, 1n] }), status.RESOURCE_EXHAUSTED, /HDBSS buffers of order 9 for 8 vCPUs needs 16/);
    } finally {
      await small.close();
    }
  });

  test("a migration with the hdbss mechanism verifies, and the guest's buffer-full faults show", async () => {
    await c().createVm({
      vm: "mig",
      vcpus: 2,
      memslots: [{ slot: 0, guestPhysAddr: BASE, memorySize: BigInt(64 * MiB) }],
      workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: 1e8 },
    });
    await c().advanceVm({ vm: "mig", durationNs: 30_000_000n }); // every page written once: none is a zero page
    // Round 0 dirties more than the threshold; round 1 rewrites those pages through the buffers.
    await c().setWorkload({ vm: "mig", workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, writesPerSecond: 15_000 } });
    await c().advanceVm({ vm: "mig", durationNs: 100_000_000n });
    const r = await migrate({ sourceVm: "mig", destinationVm: "mig2", mechanism: "hdbss", bandwidthBitsPerSecond: 1e9 }, { source: c(), destination: c() });
    assert.equal(r.verification?.match, true);
    assert.ok(r.tracker.pages_flushed_from_hdbss > 0);
    const v = (await c().getVm({ vm: "mig" })).vm!;
    assert.ok(v.vcpus.some((x) => x.hdbssFullFaults > 0n), "uniform writes over 16,384 pages overflow 512-entry buffers");
    assert.equal(v.hdbssBufferEntries, 0, "HDBSS is off after the migration");
  });
});
