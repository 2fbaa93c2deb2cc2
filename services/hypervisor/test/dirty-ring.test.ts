import assert from "node:assert/strict";
import { status } from "@grpc/grpc-js";
import { after, before, describe, test } from "node:test";
import { Capability, ExitReason, FaultKind, LogTarget, MemslotFlag, WorkloadPattern } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { bit, GiB, MiB, startHypervisor, type RunningHypervisor } from "../../../tests/hypervisor-harness.js";
import { collectDirtyRing, runSelftest } from "../../../tests/selftest.js";
import { rejects } from "../../../tests/grpc-assert.js";

const ACQ_REL = Capability.CAPABILITY_DIRTY_LOG_RING_ACQ_REL;
const LOG = MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES;
const slot0 = (bytes = 64 * MiB, flags = LOG) => ({ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(bytes), flags });


/** Every entry of one harvest: [flags, slot, offset]. */
function entries(r: { entries: Uint8Array; count: number }): [number, number, number][] {
  const dv = new DataView(r.entries.buffer, r.entries.byteOffset, r.entries.byteLength);
  return Array.from({ length: r.count }, (_, i) => [dv.getUint32(i * 16, true), dv.getUint32(i * 16 + 4, true), Number(dv.getBigUint64(i * 16 + 8, true))]);
}

describe("dirty rings", () => {
  let h: RunningHypervisor;
  before(async () => (h = await startHypervisor()));
  after(() => h.close());

  test("selftest invariant in dirty-ring mode, RESET returning the entries harvested", async () => {
    const r = await runSelftest(h.client, { vm: "st-ring", collect: collectDirtyRing, ringBytes: 1 << 20, writesPerSecond: 2e6 });
    assert.equal(r.falseDirty, 0);
    assert.equal(r.lost, 0);
    for (const n of r.dirtyPerIteration) assert.ok(n > 0x100);
  });

  test("with the vCPU running through the harvest and the reset, the invariant holds and a skipped flush is still caught", async () => {
    const r = await runSelftest(h.client, { vm: "st-ring-run", collect: collectDirtyRing, ringBytes: 1 << 20, writesPerSecond: 2e6, vcpusRun: true });
    assert.equal(r.falseDirty, 0);
    assert.equal(r.lost, 0);
    const bad = await runSelftest(h.client, { vm: "st-ring-run-noflush", collect: collectDirtyRing, ringBytes: 1 << 20, vcpusRun: true, inject: { skipTlbFlushAfterWriteProtect: true } });
    assert.ok(bad.lost > 0);
  });

  test("a harvest with the vCPU running moves the clock by its host time and takes what the vCPU pushes meanwhile", async () => {
    const c = h.client;
    await c.createVm({
      vm: "ring-run",
      vcpus: 1,
      dirtyRing: { capability: Capability.CAPABILITY_DIRTY_LOG_RING_ACQ_REL, bytes: BigInt(65536 * 16) },
      memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(GiB), flags: MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES }],
      workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: 400_000 },
    });
    await c.advanceVm({ vm: "ring-run", durationNs: 50_000_000n });
    const before = (await c.getVm({ vm: "ring-run" })).vm!;
    const waiting = before.vcpus[0].dirtyRingEntries;
    const r = await c.harvestDirtyRing({ vm: "ring-run", vcpu: 0, vcpusRun: true });
    const after = (await c.getVm({ vm: "ring-run" })).vm!;
    assert.equal(r.vcpusRan, true);
    const near = (a: bigint, b: bigint, what: string) => assert.ok(a - b <= 1n && b - a <= 1n, `${what}: ${a} against ${b}`);
    near(after.clockNs - before.clockNs, r.hostNs, "the clock moved by the harvest's host time");
    assert.ok(r.count > waiting, `${r.count} entries: more than the ${waiting} there when it started`);
    const reset = await c.resetDirtyRings({ vm: "ring-run", vcpusRun: true });
    assert.equal(Number(reset.cleared), r.count, "the reset frees exactly what was harvested; entries pushed during it wait");
    near((await c.getVm({ vm: "ring-run" })).vm!.clockNs - after.clockNs, reset.hostNs, "and by the reset's");
  });

  test("skipping the TLB flush after a ring reset loses pages, caught by the invariant", async () => {
    const r = await runSelftest(h.client, { vm: "st-ring-noflush", collect: collectDirtyRing, ringBytes: 1 << 20, inject: { skipTlbFlushAfterWriteProtect: true } });
    assert.ok(r.lost > 0);
  });

  test("a harvest that skips the entry at each wrap-around is caught: RESET frees more entries than were collected", async () => {
    // 4096-entry rings: every iteration of the selftest goes round them.
    await assert.rejects(
      runSelftest(h.client, { vm: "st-ring-wrap", collect: collectDirtyRing, ringBytes: 4096 * 16, inject: { skipRingEntryAtWrap: true } }),
      /RESET cleared \d+ entries, \d+ were harvested/,
    );
  });

  test("exact ring-full arithmetic: a 4096-entry ring takes exactly its soft limit (4032) before DIRTY_RING_FULL; the store that filled it re-executes and refaults after the reset", async () => {
    const c = h.client;
    const created = await c.createVm({
      vm: "full",
      vcpus: 1,
      dirtyRing: { capability: ACQ_REL, bytes: 4096n * 16n },
      memslots: [slot0()],
      workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: 1e6 },
    });
    assert.equal(created.vm!.dirtyRingSoftLimit, 4032);
    const a = await c.advanceVm({ vm: "full", durationNs: 100_000_000n }); // would be ~29,000 writes
    assert.equal(a.vcpus[0].writes, 4031n, "one push per distinct page; the 4032nd push exits before its store retires");
    assert.deepEqual(a.vcpus[0].exits, [{ reason: ExitReason.EXIT_REASON_DIRTY_RING_FULL, count: 1n }]);
    assert.equal(a.vcpus[0].writeFaults, 4032n, "4032 faults: the last one's store waits");
    assert.ok(a.vcpus[0].dirtyRingStallNs > 80_000_000n);
    // No progress while the ring stays full; an explicit write is not performed, and says why.
    const stalled = await c.advanceVm({ vm: "full", durationNs: 10_000_000n });
    assert.equal(stalled.vcpus[0].writes, 0n);
    const refused = await c.guestWrite({ vm: "full", writes: [{ vcpu: 0, gpa: BigInt(GiB) }] });
    assert.deepEqual([refused.results[0].performed, refused.results[0].exit], [false, ExitReason.EXIT_REASON_DIRTY_RING_FULL]);
    // Harvesting alone is not enough: only the reset frees entries.
    const got = await c.harvestDirtyRing({ vm: "full", vcpu: 0 });
    assert.equal(got.count, 4032);
    assert.deepEqual(entries(got).slice(0, 3), [[3, 0, 0], [3, 0, 1], [3, 0, 2]], "flags DIRTY|RESET, slot 0, offsets in write order");
    assert.equal((await c.advanceVm({ vm: "full", durationNs: 1_000_000n })).vcpus[0].writes, 0n);
    const reset = await c.resetDirtyRings({ vm: "full" });
    assert.deepEqual([reset.cleared, reset.tlbFlushed], [4032n, true]);
    const resumed = await c.advanceVm({ vm: "full", durationNs: 1_000_000n });
    assert.ok(resumed.vcpus[0].writes > 0n);
    // The reset re-protected page 4031, so the store that filled the ring faults again: page 4031 is pushed a second time.
    assert.deepEqual(entries(await c.harvestDirtyRing({ vm: "full", vcpu: 0, maxEntries: 2 })), [[3, 0, 4031], [3, 0, 4032]]);
    const info = (await c.getVm({ vm: "full" })).vm!;
    assert.equal(info.vcpus[0].dirtyRingFullExits, 1n);
  });

  test("GuestWrite: a batch with a paused vCPU or a GPA outside memory is refused before any write; a write whose fault fills the ring is not performed, the rest of the batch still reported", async () => {
    const c = h.client;
    await c.createVm({ vm: "gw", vcpus: 2, dirtyRing: { capability: ACQ_REL, bytes: 4096n * 16n }, memslots: [slot0()] });
    const page = (p: number) => BigInt(GiB) + 4096n * BigInt(p);
    const before = (await c.getMemoryDigest({ vm: "gw" })).sha256Hex;
    await rejects(c.guestWrite({ vm: "gw", writes: [{ vcpu: 0, gpa: page(1), value: 1n }, { vcpu: 0, gpa: 5n, value: 1n }] }), status.INVALID_ARGUMENT, /outside every memslot/);
    assert.equal((await c.getMemoryDigest({ vm: "gw" })).sha256Hex, before, "nothing of the refused batch was applied");
    // Fill vCPU 0's ring to one below its soft limit, then write two more pages and one with vCPU 1.
    for (let p = 0; p < 4031; p += 500) await c.guestWrite({ vm: "gw", writes: Array.from({ length: Math.min(500, 4031 - p) }, (_, i) => ({ vcpu: 0, gpa: page(p + i), value: 1n })) });
    const r = await c.guestWrite({ vm: "gw", writes: [{ vcpu: 0, gpa: page(5000), value: 7n }, { vcpu: 0, gpa: page(5001), value: 8n }, { vcpu: 1, gpa: page(6000), value: 9n }] });
    assert.deepEqual(
      r.results.map((x) => [x.performed, x.logged, x.exit]),
      [
        [false, true, ExitReason.EXIT_REASON_DIRTY_RING_FULL],
        [false, false, ExitReason.EXIT_REASON_DIRTY_RING_FULL],
        [true, true, ExitReason.EXIT_REASON_UNSPECIFIED],
      ],
      "the push that fills the ring exits before its store retires; the vCPU then runs nothing; the other vCPU goes on",
    );
    const t = await c.translateGpa({ vm: "gw", gpa: page(5000) });
    assert.equal(t.content, 0n, "the store that filled the ring has not retired");
    assert.equal((await c.translateGpa({ vm: "gw", gpa: page(6000) })).content, 9n);
  });

  test("GuestWrite moves a stepped VM's clock with the writing vCPU, so the next AdvanceVm runs it for its whole duration", async () => {
    const c = h.client;
    // The workload rewrites 1000 pages, all mapped after the first advance; the GuestWrites fault on 1000 others (milliseconds of faults).
    await c.createVm({
      vm: "gw-clock",
      vcpus: 1,
      memslots: [slot0(64 * MiB, 0)],
      workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: 1e6, workingSetPages: 1000n },
    });
    await c.advanceVm({ vm: "gw-clock", durationNs: 100_000_000n });
    const w = await c.guestWrite({ vm: "gw-clock", writes: Array.from({ length: 1000 }, (_, i) => ({ vcpu: 0, gpa: BigInt(GiB) + 4096n * BigInt(5000 + i), value: 1n })) });
    const took = w.results.reduce((n, x) => n + x.costNs, 0n);
    assert.ok(took > 1_000_000n, `the GuestWrites took ${took} ns of the vCPU's time`);
    assert.equal(w.clockNs, 100_000_000n + took, "the clock moved with the writes");
    const a = await c.advanceVm({ vm: "gw-clock", durationNs: 1_000_000n });
    assert.ok(a.vcpus[0].writes >= 990n, `${a.vcpus[0].writes} writes in 1 ms at 1 M/s: the vCPU did not sit out the GuestWrite's time`);
  });

  test("harvest returns every entry once, in order, across partial harvests", async () => {
    const c = h.client;
    await c.createVm({
      vm: "order",
      vcpus: 2,
      dirtyRing: { capability: ACQ_REL, bytes: 65536n },
      memslots: [slot0()],
      workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: 100_000 },
    });
    const step = await c.advanceVm({ vm: "order", durationNs: 5_000_000n });
    for (const vcpu of [0, 1]) {
      const writes = Number(step.vcpus[vcpu].writes); // each a first write to its page: one push each
      assert.ok(writes > 300);
      const seen: number[] = [];
      for (;;) {
        const r = await c.harvestDirtyRing({ vm: "order", vcpu, maxEntries: 7 });
        if (r.count === 0) break;
        assert.ok(r.count <= 7);
        seen.push(...entries(r).map((e) => e[2]));
      }
      const start = vcpu * (16384 / 2); // each vCPU streams from its own share of the working set
      assert.deepEqual(seen, Array.from({ length: writes }, (_, i) => start + i));
    }
    assert.equal((await c.resetDirtyRings({ vm: "order" })).cleared, step.writes);
    assert.equal((await c.resetDirtyRings({ vm: "order" })).cleared, 0n, "nothing harvested, nothing reset");
  });

  test("WITH_BITMAP: writes without a vCPU go to the backup bitmap, guest writes to the ring, never both", async () => {
    const c = h.client;
    await c.createVm({ vm: "wb", vcpus: 1, dirtyRing: { capability: ACQ_REL, bytes: 65536n, withBitmap: true }, memslots: [slot0()] });
    const host = await c.hostWrite({ vm: "wb", writes: [{ gpa: BigInt(GiB) + 4096n * 5n, value: 9n }] });
    assert.deepEqual(host.logged, [LogTarget.LOG_TARGET_BACKUP_BITMAP]);
    const guest = await c.guestWrite({ vm: "wb", writes: [{ vcpu: 0, gpa: BigInt(GiB) + 4096n * 6n, value: 1n }] });
    assert.deepEqual([guest.results[0].fault, guest.results[0].logged], [FaultKind.FAULT_KIND_TRANSLATION, true]);
    const ring = await c.harvestDirtyRing({ vm: "wb", vcpu: 0 });
    assert.deepEqual(entries(ring).map((e) => e[2]), [6]);
    const backup = await c.getDirtyLog({ vm: "wb", slot: 0 });
    assert.deepEqual([bit(backup.bitmap, 5), bit(backup.bitmap, 6), backup.dirtyPages], [1, 0, 1n]);
  });

  test("bad input: sizes, order, variants, and the bitmap interface while rings are on", async () => {
    const c = h.client;
    const ring = (bytes: bigint, capability = ACQ_REL) => c.createVm({ vm: `bad-${bytes}-${capability}`, vcpus: 1, dirtyRing: { capability, bytes } });
    await rejects(ring(65536n + 16n), status.INVALID_ARGUMENT, /not a power of two.*EINVAL/);
    await rejects(ring(2048n), status.INVALID_ARGUMENT, /smaller than one page or the 64 reserved entries.*EINVAL/);
    await rejects(ring(2n << 20n), status.INVALID_ARGUMENT, /more than 65536 entries.*E2BIG/);
    await rejects(ring(0n), status.INVALID_ARGUMENT, /not a power of two.*EINVAL/);
    await rejects(ring(65536n, Capability.CAPABILITY_DIRTY_LOG_RING), status.INVALID_ARGUMENT, /offers only DIRTY_LOG_RING_ACQ_REL.*EINVAL/);
    await c.createVm({ vm: "plain", vcpus: 1, memslots: [slot0(MiB)] });
    await rejects(c.enableCap({ vm: "plain", capability: ACQ_REL, args: [65536n] }), status.FAILED_PRECONDITION, /before any vCPU.*EINVAL/);
    await rejects(c.enableCap({ vm: "plain", capability: Capability.CAPABILITY_DIRTY_LOG_RING_WITH_BITMAP }), status.FAILED_PRECONDITION, /needs a dirty ring first/);
    await rejects(c.harvestDirtyRing({ vm: "plain", vcpu: 0 }), status.FAILED_PRECONDITION, /has no dirty ring.*EINVAL/);
    await rejects(c.resetDirtyRings({ vm: "plain" }), status.FAILED_PRECONDITION, /has no dirty ring.*EINVAL/);
    await c.createVm({ vm: "ringed", vcpus: 1, dirtyRing: { capability: ACQ_REL, bytes: 65536n }, memslots: [slot0(MiB)] });
    await rejects(c.enableCap({ vm: "ringed", capability: Capability.CAPABILITY_DIRTY_LOG_RING_WITH_BITMAP }), status.FAILED_PRECONDITION, /before any memslot/);
    await rejects(c.enableCap({ vm: "ringed", capability: ACQ_REL, args: [65536n] }), status.FAILED_PRECONDITION, /already configured.*EINVAL/);
    await rejects(c.getDirtyLog({ vm: "ringed", slot: 0 }), status.FAILED_PRECONDITION, /logs to dirty rings.*ENXIO/);
    await rejects(c.clearDirtyLog({ vm: "ringed", slot: 0, numPages: 64, bitmap: Buffer.alloc(8) }), status.FAILED_PRECONDITION, /ENXIO/);
    await rejects(c.hostWrite({ vm: "ringed", writes: [{ gpa: BigInt(GiB) }] }), status.FAILED_PRECONDITION, /WITH_BITMAP/);
    await rejects(c.harvestDirtyRing({ vm: "ringed", vcpu: 4 }), status.INVALID_ARGUMENT, /no vCPU 4/);
    const ext = async (capability: Capability) => (await c.checkExtension({ capability })).value;
    assert.deepEqual([await ext(Capability.CAPABILITY_DIRTY_LOG_RING), await ext(ACQ_REL), await ext(Capability.CAPABILITY_DIRTY_LOG_RING_WITH_BITMAP)], [0n, 1048576n, 1n]);
  });
});
