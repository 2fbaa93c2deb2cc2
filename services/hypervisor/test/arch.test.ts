/**
 * Where the architectures differ behind the seam (arch.ts): how a mask of
 * pages is re-armed (arm64's stage2_wp_range from the lowest to the highest
 * set page; x86's walks of each set bit), for CLEAR and for a ring reset;
 * x86's eager_page_split; the address spaces. The protection walks on their
 * own first, without a server.
 */
import assert from "node:assert/strict";
import { status } from "@grpc/grpc-js";
import { after, before, describe, test } from "node:test";
import { Arch, BackingPageSize, Capability, ManualProtectFlag, MemslotFlag } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { GiB, MiB, startHypervisor, type RunningHypervisor } from "../../../tests/hypervisor-harness.js";
import { rejects } from "../../../tests/grpc-assert.js";
import { PAGE_RW } from "../model/descriptor.js";
import { Memslot } from "../model/memslot.js";
import { ExactProtect, SpanProtect } from "../model/protect-masked.js";

const BASE = BigInt(GiB);
const LOG = MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES;

/** A 256-page slot with every page mapped writable. */
function writableSlot(): Memslot {
  const slot = new Memslot(0, GiB, 256 * 4096, 0, GiB);
  for (let p = 0; p < slot.npages; p++) slot.s2.mapPage(p, PAGE_RW);
  return slot;
}
const writablePages = (slot: Memslot) => Array.from({ length: slot.npages }, (_, p) => p).filter((p) => (slot.s2.writable[p >>> 5] >>> (p & 31)) & 1);
const protectedPages = (slot: Memslot) => {
  const w = new Set(writablePages(slot));
  return Array.from({ length: slot.npages }, (_, p) => p).filter((p) => !w.has(p));
};

describe("re-arming a mask of pages, on its own", () => {
  test("the span walk protects from the lowest to the highest set page; the exact walk only the set pages", () => {
    const span = writableSlot();
    const sp = new SpanProtect(span, false, false);
    sp.mask(64, (1 << 3) | (1 << 31), 1 << 4); // pages 67, 95, 100
    assert.equal(sp.done(), 0);
    assert.deepEqual(protectedPages(span), Array.from({ length: 100 - 67 + 1 }, (_, i) => 67 + i));

    const exact = writableSlot();
    const ex = new ExactProtect(exact, false, false);
    ex.mask(64, (1 << 3) | (1 << 31), 1 << 4);
    ex.mask(128, -1, 0); // a full low half: one run of 32
    ex.mask(160, 0, -1 << 28); // the top 4 bits of the high half: pages 220-223
    ex.done();
    assert.deepEqual(protectedPages(exact), [67, 95, 100, ...Array.from({ length: 32 }, (_, i) => 128 + i), 220, 221, 222, 223]);
  });

  test("with setDbm, writable pages become writable-clean (DBM / W with D clear), not read-only", () => {
    const slot = writableSlot();
    const ex = new ExactProtect(slot, false, true);
    ex.mask(0, 0b101, 0);
    ex.done();
    assert.deepEqual(protectedPages(slot), [0, 2]);
    assert.ok(slot.s2.pte.hi[0] !== 0 && slot.s2.pte.hi[1] === 0, "page 0 has DBM, page 1 untouched");
  });
});

describe("the architectures over gRPC", () => {
  let h: RunningHypervisor;
  before(async () => (h = await startHypervisor()));
  after(() => h.close());
  const c = () => h.client;
  const write = (vm: string, pages: number[]) => c().guestWrite({ vm, writes: pages.map((p) => ({ vcpu: 0, gpa: BASE + BigInt(p) * 4096n, value: BigInt(p + 1) })) });
  const writable = async (vm: string, page: number) => (await c().translateGpa({ vm, gpa: BASE + BigInt(page) * 4096n })).writable;

  test("CLEAR of pages 0 and 63: arm64 re-protects 0-63, x86 exactly the two", async () => {
    for (const [vm, arch, page30Writable] of [
      ["clr-arm", Arch.ARCH_ARM64, false],
      ["clr-x86", Arch.ARCH_X86_64, true],
    ] as const) {
      await c().createVm({ vm, vcpus: 1, arch });
      await c().enableCap({ vm, capability: Capability.CAPABILITY_MANUAL_DIRTY_LOG_PROTECT2, args: [BigInt(ManualProtectFlag.MANUAL_PROTECT_FLAG_MANUAL_PROTECT_ENABLE)] });
      await c().setUserMemoryRegion({ vm, memslot: { slot: 0, guestPhysAddr: BASE, memorySize: BigInt(MiB), flags: LOG } });
      await write(vm, Array.from({ length: 64 }, (_, p) => p));
      await c().getDirtyLog({ vm, slot: 0 }); // manual protect: nothing re-protected yet
      const mask = Buffer.alloc(8);
      mask.writeBigUInt64LE((1n << 63n) | 1n);
      const cl = await c().clearDirtyLog({ vm, slot: 0, firstPage: 0n, numPages: 64, bitmap: mask });
      assert.equal(cl.pagesCleared, 2n);
      assert.deepEqual([await writable(vm, 0), await writable(vm, 63), await writable(vm, 30)], [false, false, page30Writable], vm);
      // Either way nothing is lost: page 30 is still in the log, and CLEAR of it re-arms it.
      assert.equal((await c().getDirtyLog({ vm, slot: 0 })).bitmap[3] & (1 << 6), 1 << 6);
    }
  });

  test("a ring reset of pages 0 and 10, page 5's entry not yet harvested: arm64 re-protects 0-10, x86 the two", async () => {
    for (const [vm, arch, capability, page5Writable] of [
      ["rr-arm", Arch.ARCH_ARM64, Capability.CAPABILITY_DIRTY_LOG_RING_ACQ_REL, false],
      ["rr-x86", Arch.ARCH_X86_64, Capability.CAPABILITY_DIRTY_LOG_RING, true],
    ] as const) {
      await c().createVm({ vm, vcpus: 1, arch, dirtyRing: { capability, bytes: 65536n } });
      await c().setUserMemoryRegion({ vm, memslot: { slot: 0, guestPhysAddr: BASE, memorySize: BigInt(MiB), flags: LOG } });
      await write(vm, [0, 10, 5]);
      assert.equal((await c().harvestDirtyRing({ vm, vcpu: 0, maxEntries: 2 })).count, 2);
      assert.equal((await c().resetDirtyRings({ vm })).cleared, 2n, "the reset stops at page 5's unharvested entry");
      assert.deepEqual([await writable(vm, 0), await writable(vm, 10), await writable(vm, 5)], [false, false, page5Writable], vm);
      const rest = await c().harvestDirtyRing({ vm, vcpu: 0 });
      assert.deepEqual([rest.count, rest.entries.readUInt32LE(8)], [1, 5], "page 5 is still reported");
    }
  });

  test("x86's eager_page_split: Y (the default) splits huge pages when logging starts, N on each first write", async () => {
    const slot = { slot: 0, guestPhysAddr: BASE, memorySize: BigInt(4 * MiB) };
    const blocks = async (vm: string) => (await c().getVm({ vm })).vm!.memslots[0].mappedBlocks2m;
    for (const [vm, eagerPageSplit, left] of [
      ["eps-default", undefined, 0n],
      ["eps-off", false, 2n],
    ] as const) {
      await c().createVm({ vm, vcpus: 1, arch: Arch.ARCH_X86_64, backingPageSize: BackingPageSize.BACKING_PAGE_SIZE_2M, eagerPageSplit, memslots: [slot] });
      assert.equal((await c().getVm({ vm })).vm!.eagerPageSplit, eagerPageSplit ?? true);
      await write(vm, [0, 512]);
      assert.equal(await blocks(vm), 2n, "logging off: 2 MiB blocks");
      await c().setUserMemoryRegion({ vm, memslot: { ...slot, flags: LOG } });
      assert.equal(await blocks(vm), left, vm);
      const r = await write(vm, [1, 513]);
      assert.ok(r.results.every((x) => x.logged), "every write while logging is logged");
      assert.equal(await blocks(vm), 0n, "split by the first write faults at the latest");
    }
    await rejects(c().createVm({ vm: "eps-arm", vcpus: 1, eagerPageSplit: true }), status.INVALID_ARGUMENT, /eager_page_split is x86's.*EINVAL/);
    assert.equal((await c().createVm({ vm: "eps-arm-info", vcpus: 1 })).vm!.eagerPageSplit, false);
  });

  test("address spaces: x86 has SMM's second one (not populated here), arm64 one", async () => {
    await c().createVm({ vm: "as-x86", vcpus: 1, arch: Arch.ARCH_X86_64 });
    await c().createVm({ vm: "as-arm", vcpus: 1 });
    await rejects(c().getDirtyLog({ vm: "as-x86", slot: 1 << 16 }), status.NOT_FOUND, /no memslot 65536.*ENOENT/);
    await rejects(c().getDirtyLog({ vm: "as-x86", slot: 2 << 16 }), status.INVALID_ARGUMENT, /address space 2 does not exist on x86_64.*EINVAL/);
    await rejects(c().getDirtyLog({ vm: "as-arm", slot: 1 << 16 }), status.INVALID_ARGUMENT, /address space 1 does not exist on arm64.*EINVAL/);
    const smm = { slot: 1 << 16, guestPhysAddr: BASE, memorySize: BigInt(MiB) };
    await rejects(c().setUserMemoryRegion({ vm: "as-x86", memslot: smm }), status.INVALID_ARGUMENT, /address space 1 \(SMM\) is not modelled.*EINVAL/);
    await rejects(c().setUserMemoryRegion({ vm: "as-arm", memslot: smm }), status.INVALID_ARGUMENT, /address space 1 does not exist on arm64/);
  });
});
