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

  test("exact ring-full arithmetic: a 4096-entry ring takes exactly its soft limit (4032) before DIRTY_RING_FULL", async () => {
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
    assert.equal(a.vcpus[0].writes, 4032n, "one push per distinct page, none past the soft limit");
    assert.deepEqual(a.vcpus[0].exits, [{ reason: ExitReason.EXIT_REASON_DIRTY_RING_FULL, count: 1n }]);
    assert.ok(a.vcpus[0].dirtyRingStallNs > 80_000_000n);
    // No progress while the ring stays full.
    const stalled = await c.advanceVm({ vm: "full", durationNs: 10_000_000n });
    assert.equal(stalled.vcpus[0].writes, 0n);
    await rejects(c.guestWrite({ vm: "full", writes: [{ vcpu: 0, gpa: BigInt(GiB) }] }), status.FAILED_PRECONDITION, /DIRTY_RING_FULL/);
    // Harvesting alone is not enough: only the reset frees entries.
    const got = await c.harvestDirtyRing({ vm: "full", vcpu: 0 });
    assert.equal(got.count, 4032);
    assert.deepEqual(entries(got).slice(0, 3), [[3, 0, 0], [3, 0, 1], [3, 0, 2]], "flags DIRTY|RESET, slot 0, offsets in write order");
    assert.equal((await c.advanceVm({ vm: "full", durationNs: 1_000_000n })).vcpus[0].writes, 0n);
    const reset = await c.resetDirtyRings({ vm: "full" });
    assert.deepEqual([reset.cleared, reset.tlbFlushed], [4032n, true]);
    const resumed = await c.advanceVm({ vm: "full", durationNs: 1_000_000n });
    assert.ok(resumed.vcpus[0].writes > 0n);
    const info = (await c.getVm({ vm: "full" })).vm!;
    assert.equal(info.vcpus[0].dirtyRingFullExits, 1n);
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
