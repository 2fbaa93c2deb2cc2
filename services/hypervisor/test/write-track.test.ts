import assert from "node:assert/strict";
import { status } from "@grpc/grpc-js";
import { after, before, describe, test } from "node:test";
import { Arch, BackingPageSize, Capability, FaultKind, MemslotFlag, WorkloadPattern, type WatchWriteTrackingResponse } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { bit, GiB, MiB, startHypervisor, type RunningHypervisor } from "../../../tests/hypervisor-harness.js";
import { addWriteTracking, MAX_QUEUED_EVENTS, USHRT_MAX } from "../model/write-track.js";
import { rejects } from "../../../tests/grpc-assert.js";

const BASE = BigInt(GiB);
const GFN = BASE / 4096n;


/** Opens a notifier stream; collects events until `until` says stop. */
function watch(h: RunningHypervisor, vm: string) {
  const events: WatchWriteTrackingResponse[] = [];
  const it = h.client.watchWriteTracking({ vm })[Symbol.asyncIterator]();
  const next = async (n: number) => {
    while (events.length < n) {
      const r = await it.next();
      if (r.done) break;
      events.push(r.value);
    }
    return events;
  };
  return { events, next, it };
}

describe("write tracking with notifiers", () => {
  let h: RunningHypervisor;
  before(async () => (h = await startHypervisor()));
  after(() => h.close());

  test("tracking write-protects the page, splits its block, and keeps blocks away while tracked", async () => {
    const c = h.client;
    await c.createVm({ arch: Arch.ARCH_X86_64, vm: "wp", vcpus: 1, backingPageSize: BackingPageSize.BACKING_PAGE_SIZE_2M, memslots: [{ slot: 0, guestPhysAddr: BASE, memorySize: BigInt(4 * MiB) }] });
    await c.guestWrite({ vm: "wp", writes: [{ vcpu: 0, gpa: BASE }] });
    assert.equal((await c.translateGpa({ vm: "wp", gpa: BASE + 4096n * 3n })).level, 2);
    assert.equal((await c.addWriteTracking({ vm: "wp", gfn: GFN + 3n })).count, 1);
    assert.equal((await c.addWriteTracking({ vm: "wp", gfn: GFN + 3n })).count, 2, "reference counted");
    const t = await c.translateGpa({ vm: "wp", gpa: BASE + 4096n * 3n });
    assert.deepEqual([t.level, t.writable], [3, false]);
    assert.equal((await c.translateGpa({ vm: "wp", gpa: BASE + 4096n * 4n })).writable, true, "the rest of the split block keeps its permissions");
    // A fault in the second 2 MiB region maps a block; the tracked region stays in pages.
    await c.guestWrite({ vm: "wp", writes: [{ vcpu: 0, gpa: BASE + BigInt(2 * MiB) }] });
    assert.equal((await c.translateGpa({ vm: "wp", gpa: BASE + BigInt(2 * MiB) })).level, 2);
    const w = await c.guestWrite({ vm: "wp", writes: [{ vcpu: 0, gpa: BASE + 4096n * 3n, value: 77n }] });
    assert.equal(w.results[0].fault, FaultKind.FAULT_KIND_TRACKED);
    const after1 = await c.translateGpa({ vm: "wp", gpa: BASE + 4096n * 3n });
    assert.deepEqual([after1.writable, after1.content], [false, 77n], "the write was emulated; the page stays protected");
    assert.equal((await c.removeWriteTracking({ vm: "wp", gfn: GFN + 3n })).count, 1);
    assert.equal((await c.removeWriteTracking({ vm: "wp", gfn: GFN + 3n })).count, 0);
    await rejects(c.removeWriteTracking({ vm: "wp", gfn: GFN + 3n }), status.FAILED_PRECONDITION, /not tracked/);
    const free = await c.guestWrite({ vm: "wp", writes: [{ vcpu: 0, gpa: BASE + 4096n * 3n }] });
    assert.equal(free.results[0].fault, FaultKind.FAULT_KIND_PERMISSION, "untracked again: an ordinary fault makes it writable");
    assert.equal((await c.translateGpa({ vm: "wp", gpa: BASE + 4096n * 3n })).writable, true);
  });

  test("every tracked write reaches every subscriber once, in order per vCPU, with its new value", async () => {
    const c = h.client;
    await c.createVm({ arch: Arch.ARCH_X86_64, vm: "n", vcpus: 2, memslots: [{ slot: 0, guestPhysAddr: BASE, memorySize: BigInt(MiB) }] });
    await c.addWriteTracking({ vm: "n", gfn: GFN + 1n });
    await c.addWriteTracking({ vm: "n", gfn: GFN + 2n });
    const a = watch(h, "n");
    const b = watch(h, "n");
    await a.next(1);
    await b.next(1);
    const writes = [];
    for (let i = 1; i <= 5; i++) {
      writes.push({ vcpu: 0, gpa: BASE + 4096n, value: BigInt(i) });
      writes.push({ vcpu: 1, gpa: BASE + 8192n, value: BigInt(100 + i) });
      writes.push({ vcpu: 0, gpa: BASE + 4096n * 9n, value: 999n }); // untracked: no event
    }
    const res = await c.guestWrite({ vm: "n", writes });
    assert.equal(res.results.filter((r) => r.fault === FaultKind.FAULT_KIND_TRACKED).length, 10);
    for (const s of [a, b]) {
      const ev = await s.next(11);
      assert.ok(ev[0].subscriptionId! > 0n);
      assert.deepEqual(ev.map((e) => e.seq), Array.from({ length: 11 }, (_, i) => BigInt(i + 1)));
      const tw = ev.slice(1).map((e) => e.trackWrite!);
      assert.deepEqual(tw.filter((e) => e.vcpu === 0).map((e) => [e.gpa, e.newValue]), [1n, 2n, 3n, 4n, 5n].map((v) => [BASE + 4096n, v]));
      assert.deepEqual(tw.filter((e) => e.vcpu === 1).map((e) => e.newValue), [101n, 102n, 103n, 104n, 105n]);
    }
    // A slot going away is announced; then unsubscribing ends the stream, and a second time is NOT_FOUND.
    await c.setUserMemoryRegion({ vm: "n", memslot: { slot: 0, guestPhysAddr: BASE, memorySize: 0n } });
    const removed = (await a.next(12))[11].trackRemoveRegion!;
    assert.deepEqual([removed.gfn, removed.nrPages], [GFN, 256n]);
    const id = a.events[0].subscriptionId!;
    await c.unwatchWriteTracking({ vm: "n", subscriptionId: id });
    assert.equal((await a.it.next()).done, true);
    await rejects(c.unwatchWriteTracking({ vm: "n", subscriptionId: id }), status.NOT_FOUND, /already unsubscribed.*ENOENT/);
    await b.it.return?.();
  });

  test("tracked writes are logged once per round, in the bitmap and in the ring", async () => {
    const c = h.client;
    const flags = MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES;
    await c.createVm({ arch: Arch.ARCH_X86_64, vm: "bm", vcpus: 1, memslots: [{ slot: 0, guestPhysAddr: BASE, memorySize: BigInt(MiB), flags }] });
    await c.addWriteTracking({ vm: "bm", gfn: GFN + 5n });
    const three = [1n, 2n, 3n].map((value) => ({ vcpu: 0, gpa: BASE + 4096n * 5n, value }));
    await c.guestWrite({ vm: "bm", writes: three });
    const g = await c.getDirtyLog({ vm: "bm", slot: 0 });
    assert.deepEqual([g.dirtyPages, bit(g.bitmap, 5)], [1n, 1]);
    await c.guestWrite({ vm: "bm", writes: three });
    assert.equal((await c.getDirtyLog({ vm: "bm", slot: 0 })).dirtyPages, 1n, "written again after the sync: logged again");

    await c.createVm({
      arch: Arch.ARCH_X86_64,
      vm: "rg",
      vcpus: 1,
      dirtyRing: { capability: Capability.CAPABILITY_DIRTY_LOG_RING_ACQ_REL, bytes: 65536n },
      memslots: [{ slot: 0, guestPhysAddr: BASE, memorySize: BigInt(MiB), flags }],
    });
    await c.addWriteTracking({ vm: "rg", gfn: GFN + 5n });
    const logged = await c.guestWrite({ vm: "rg", writes: three });
    assert.deepEqual(logged.results.map((r) => r.logged), [true, true, true]);
    assert.equal((await c.harvestDirtyRing({ vm: "rg", vcpu: 0 })).count, 1, "one entry until it is reset");
    assert.equal((await c.resetDirtyRings({ vm: "rg" })).cleared, 1n);
    await c.guestWrite({ vm: "rg", writes: three });
    assert.equal((await c.harvestDirtyRing({ vm: "rg", vcpu: 0 })).count, 1);
  });

  test("bad input: GFN outside every slot, past USHRT_MAX references, unknown VM", async () => {
    const c = h.client;
    await c.createVm({ arch: Arch.ARCH_X86_64, vm: "lim", vcpus: 1, memslots: [{ slot: 0, guestPhysAddr: BASE, memorySize: BigInt(MiB) }] });
    await rejects(c.addWriteTracking({ vm: "lim", gfn: 7n }), status.INVALID_ARGUMENT, /not in any memslot.*EINVAL/);
    await rejects(c.removeWriteTracking({ vm: "lim", gfn: GFN + 10000n }), status.INVALID_ARGUMENT, /not in any memslot/);
    const vm = h.hypervisor.vm("lim");
    for (let i = 0; i < USHRT_MAX; i++) addWriteTracking(vm, Number(GFN));
    await rejects(c.addWriteTracking({ vm: "lim", gfn: GFN }), status.RESOURCE_EXHAUSTED, /65535 times \(USHRT_MAX\)/);
    await rejects(c.watchWriteTracking({ vm: "ghost" })[Symbol.asyncIterator]().next(), status.NOT_FOUND, /no VM named 'ghost'/);
  });

  test("a subscriber that stops reading is disconnected, the guest never stalls", async () => {
    const c = h.client;
    await c.createVm({
      arch: Arch.ARCH_X86_64,
      vm: "slow",
      vcpus: 1,
      memslots: [{ slot: 0, guestPhysAddr: BASE, memorySize: BigInt(MiB) }],
      workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, writesPerSecond: 1e6, workingSetPages: 1n },
    });
    await c.addWriteTracking({ vm: "slow", gfn: GFN });
    const tracker = h.hypervisor.vm("slow").writeTrack;
    const sub = tracker.subscribe(); // never read
    const a = await c.advanceVm({ vm: "slow", durationNs: 400_000_000n });
    assert.ok(a.writes > BigInt(MAX_QUEUED_EVENTS), `${a.writes} tracked writes`);
    assert.equal(sub.closed?.error?.message.includes("fell more than 65536 events behind"), true);
    assert.equal(tracker.droppedSubscribers, 1);
    assert.equal(tracker.subscribers.size, 0);
  });
});
