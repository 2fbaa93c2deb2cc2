import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import {
  BackingPageSize,
  Capability,
  FaultKind,
  MemslotFlag,
  WorkloadPattern,
} from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { bit, GiB, MiB, startHypervisor, type RunningHypervisor } from "../../../tests/hypervisor-harness.js";

const LOG = MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES;
const BASE = BigInt(GiB);

describe("stage-2 MMU: blocks, splitting, TLB and the write path", () => {
  let h: RunningHypervisor;
  before(async () => (h = await startHypervisor()));
  after(() => h.close());

  const slotInfo = async (vm: string) => (await h.client.getVm({ vm })).vm!.memslots[0];
  const write = (vm: string, gpa: bigint, value = 1n, vcpu = 0) => h.client.guestWrite({ vm, writes: [{ vcpu, gpa, value }] }).then((r) => r.results[0]);
  const setLogging = (vm: string, size: bigint, on: boolean) =>
    h.client.setUserMemoryRegion({ vm, memslot: { slot: 0, guestPhysAddr: BASE, memorySize: size, flags: on ? LOG : 0 } });

  test("2 MiB backing maps blocks on first touch; eager split on enabling logging leaves write-protected pages", async () => {
    const size = 64n * BigInt(MiB);
    await h.client.createVm({
      vm: "eager",
      vcpus: 1,
      backingPageSize: BackingPageSize.BACKING_PAGE_SIZE_2M,
      eagerSplitChunkSize: BigInt(2 * MiB),
      memslots: [{ slot: 0, guestPhysAddr: BASE, memorySize: size }],
    });
    for (let off = 0n; off < size; off += BigInt(2 * MiB)) assert.equal((await write("eager", BASE + off)).fault, FaultKind.FAULT_KIND_TRANSLATION);
    let s = await slotInfo("eager");
    assert.equal(s.mappedBlocks2m, 32n);
    assert.equal(s.mappedPages4k, 0n);
    const t = await h.client.translateGpa({ vm: "eager", gpa: BASE + 4096n * 7n });
    assert.deepEqual([t.level, t.writable, t.dbm], [2, true, false]);
    assert.equal(t.descriptor & 0x80n, 0x80n, "S2AP_W is bit 7");

    const r = await setLogging("eager", size, true);
    assert.ok(r.hostNs > 0n);
    s = await slotInfo("eager");
    assert.equal(s.mappedBlocks2m, 0n);
    assert.equal(s.mappedPages4k, size / 4096n);
    const p = await h.client.translateGpa({ vm: "eager", gpa: BASE + 4096n * 7n });
    assert.deepEqual([p.level, p.writable, p.readable], [3, false, true]);
    // A write now faults on the page, makes it writable and logs it.
    const w = await write("eager", BASE + 4096n * 7n);
    assert.deepEqual([w.fault, w.logged], [FaultKind.FAULT_KIND_PERMISSION, true]);
    assert.equal((await h.client.translateGpa({ vm: "eager", gpa: BASE + 4096n * 7n })).writable, true);
  });

  test("split on fault (chunk size 0): logging write-protects blocks; a write breaks its block, the rest fault back in", async () => {
    const size = 8n * BigInt(MiB);
    await h.client.createVm({
      vm: "lazy",
      vcpus: 1,
      backingPageSize: BackingPageSize.BACKING_PAGE_SIZE_2M,
      memslots: [{ slot: 0, guestPhysAddr: BASE, memorySize: size }],
    });
    for (let off = 0n; off < size; off += BigInt(2 * MiB)) await write("lazy", BASE + off);
    await setLogging("lazy", size, true);
    const blk = await h.client.translateGpa({ vm: "lazy", gpa: BASE + 4096n });
    assert.deepEqual([blk.level, blk.writable], [2, false], "the block stays, write-protected");
    const w = await write("lazy", BASE + 4096n * 3n);
    assert.deepEqual([w.fault, w.logged], [FaultKind.FAULT_KIND_PERMISSION, true]);
    const s = await slotInfo("lazy");
    assert.equal(s.mappedBlocks2m, 3n);
    assert.equal(s.mappedPages4k, 1n);
    assert.equal((await h.client.translateGpa({ vm: "lazy", gpa: BASE + 4096n * 3n })).level, 3);
    assert.equal((await h.client.translateGpa({ vm: "lazy", gpa: BASE + 4096n * 4n })).mapped, false);
    const next = await write("lazy", BASE + 4096n * 4n);
    assert.deepEqual([next.fault, next.logged], [FaultKind.FAULT_KIND_TRANSLATION, true]);

    // Logging off: the next fault in the split region coalesces it back into a block.
    await setLogging("lazy", size, false);
    await h.client.guestWrite({ vm: "lazy", writes: [{ vcpu: 0, gpa: BASE + 4096n * 9n, value: 5n }] });
    const back = await h.client.translateGpa({ vm: "lazy", gpa: BASE + 4096n * 9n });
    assert.deepEqual([back.level, back.writable], [2, true]);
  });

  test("1 GiB backing maps a level-1 block when the region lies wholly inside the slot, 2 MiB or pages at the edges", async () => {
    await h.client.createVm({
      vm: "huge",
      vcpus: 1,
      backingPageSize: BackingPageSize.BACKING_PAGE_SIZE_1G,
      memslots: [{ slot: 0, guestPhysAddr: BASE, memorySize: BigInt(GiB) + BigInt(2 * MiB) + 8192n }],
    });
    await write("huge", BASE + 12345n * 4096n);
    assert.equal((await h.client.translateGpa({ vm: "huge", gpa: BASE + 4096n })).level, 1);
    await write("huge", BASE + BigInt(GiB) + 4096n);
    assert.equal((await h.client.translateGpa({ vm: "huge", gpa: BASE + BigInt(GiB) })).level, 2);
    await write("huge", BASE + BigInt(GiB) + BigInt(2 * MiB));
    assert.equal((await h.client.translateGpa({ vm: "huge", gpa: BASE + BigInt(GiB) + BigInt(2 * MiB) })).level, 3);
  });

  test("seed 004's ordering: after GET the TLB is flushed, so the next write faults and is logged again", async () => {
    await h.client.createVm({ vm: "order", vcpus: 1, memslots: [{ slot: 0, guestPhysAddr: BASE, memorySize: BigInt(MiB), flags: LOG }] });
    const gpa = BASE + 4096n * 10n;
    assert.equal((await write("order", gpa, 1n)).logged, true);
    assert.equal((await write("order", gpa, 2n)).fault, FaultKind.FAULT_KIND_UNSPECIFIED, "second write hits the TLB");
    const g1 = await h.client.getDirtyLog({ vm: "order", slot: 0 });
    assert.deepEqual([bit(g1.bitmap, 10), g1.tlbFlushed, g1.dirtyPages], [1, true, 1n]);
    assert.deepEqual((await h.client.translateGpa({ vm: "order", gpa })).tlbWritableVcpus, []);
    const w = await write("order", gpa, 3n);
    assert.deepEqual([w.fault, w.logged], [FaultKind.FAULT_KIND_PERMISSION, true]);
    assert.equal(bit((await h.client.getDirtyLog({ vm: "order", slot: 0 })).bitmap, 10), 1);

    // With the flush skipped, the stale writable TLB entry lets the write through unlogged.
    await h.client.setFaultInjection({ vm: "order", skipTlbFlushAfterWriteProtect: true });
    await write("order", gpa, 4n);
    const g2 = await h.client.getDirtyLog({ vm: "order", slot: 0 });
    assert.equal(g2.tlbFlushed, false);
    const lost = await write("order", gpa, 5n);
    assert.deepEqual([lost.fault, lost.logged], [FaultKind.FAULT_KIND_UNSPECIFIED, false]);
    assert.equal(bit((await h.client.getDirtyLog({ vm: "order", slot: 0 })).bitmap, 10), 0, "the write of 5 is lost");
    assert.equal((await h.client.translateGpa({ vm: "order", gpa })).content, 5n);
  });

  test("CLEAR re-protects only pages set in both bitmaps; INITIALLY_SET with eager split splits inside CLEAR", async () => {
    await h.client.createVm({
      vm: "clear",
      vcpus: 1,
      backingPageSize: BackingPageSize.BACKING_PAGE_SIZE_2M,
      eagerSplitChunkSize: BigInt(2 * MiB),
      memslots: [{ slot: 0, guestPhysAddr: BASE, memorySize: BigInt(4 * MiB) }],
    });
    await write("clear", BASE);
    await write("clear", BASE + BigInt(2 * MiB));
    await h.client.enableCap({ vm: "clear", capability: Capability.CAPABILITY_MANUAL_DIRTY_LOG_PROTECT2, args: [3n] });
    const en = await setLogging("clear", BigInt(4 * MiB), true);
    assert.equal(en.hostNs, 60000n, "INITIALLY_SET enables at a fixed cost: nothing is protected or split");
    assert.equal((await slotInfo("clear")).mappedBlocks2m, 2n);
    const g = await h.client.getDirtyLog({ vm: "clear", slot: 0 });
    assert.equal(g.dirtyPages, 1024n);
    assert.equal(g.pagesWriteProtected, 0n, "manual protect: GET only copies");
    // Clear pages 0..63 only: the first block splits, the second stays a writable block.
    const bm = Buffer.alloc(8, 0xff);
    const c = await h.client.clearDirtyLog({ vm: "clear", slot: 0, firstPage: 0n, numPages: 64, bitmap: bm });
    assert.equal(c.pagesCleared, 64n);
    assert.equal((await h.client.translateGpa({ vm: "clear", gpa: BASE })).level, 3);
    assert.equal((await h.client.translateGpa({ vm: "clear", gpa: BASE })).writable, false);
    const second = await h.client.translateGpa({ vm: "clear", gpa: BASE + BigInt(2 * MiB) });
    assert.deepEqual([second.level, second.writable], [2, true]);
    // Clearing the same pages again clears nothing: their bits are already clear.
    assert.equal((await h.client.clearDirtyLog({ vm: "clear", slot: 0, firstPage: 0n, numPages: 64, bitmap: bm })).pagesCleared, 0n);
    const after = await h.client.getDirtyLog({ vm: "clear", slot: 0 });
    assert.equal(after.dirtyPages, 1024n - 64n);
  });

  test("vCPUs that fault pay for it: the achieved write rate drops while logging", async () => {
    await h.client.createVm({
      vm: "rate",
      vcpus: 2,
      memslots: [{ slot: 0, guestPhysAddr: BASE, memorySize: BigInt(256 * MiB) }],
      workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, writesPerSecond: 1e6 },
    });
    await h.client.advanceVm({ vm: "rate", durationNs: 200_000_000n }); // populate most pages
    const warm = await h.client.advanceVm({ vm: "rate", durationNs: 50_000_000n });
    await setLogging("rate", BigInt(256 * MiB), true);
    const logging = await h.client.advanceVm({ vm: "rate", durationNs: 50_000_000n });
    const rate = (a: typeof warm) => a.vcpus[0].achievedWritesPerSecond;
    assert.ok(rate(logging) < rate(warm) * 0.5, `logging ${rate(logging)} vs warm ${rate(warm)} writes/s`);
    assert.ok(logging.vcpus[0].trackingOverheadNs > 0n);
    assert.equal(warm.vcpus[0].trackingOverheadNs, 0n);
  });
});
