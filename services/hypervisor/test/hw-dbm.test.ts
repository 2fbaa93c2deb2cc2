import assert from "node:assert/strict";
import { status } from "@grpc/grpc-js";
import { after, before, describe, test } from "node:test";
import { Capability, FaultKind, MemslotFlag } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { bit, GiB, MiB, startHypervisor, type RunningHypervisor } from "../../../tests/hypervisor-harness.js";

const HW = Capability.CAPABILITY_ARM_HW_DIRTY_LOG;
const BASE = BigInt(GiB);
const LOG = MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES;
const dbmOn = (c: RunningHypervisor["client"], vm: string) => c.enableCap({ vm, capability: HW, args: [1n] }).then(() => undefined);

describe("arm64 hardware DBM (seed 003)", () => {
  let h: RunningHypervisor;
  before(async () => (h = await startHypervisor()));
  after(() => h.close());
  const c = () => h.client;
  const write = (vm: string, page: bigint, value = 1n) => c().guestWrite({ vm, writes: [{ vcpu: 0, gpa: BASE + page * 4096n, value }] }).then((r) => r.results[0]);
  const tr = (vm: string, page: bigint) => c().translateGpa({ vm, gpa: BASE + page * 4096n });
  const setLog = (vm: string, on: boolean) => c().setUserMemoryRegion({ vm, memslot: { slot: 0, guestPhysAddr: BASE, memorySize: BigInt(MiB), flags: on ? LOG : 0 } });

  test("DBM goes on writable descriptors only; writes to writable-clean pages do not fault; GET's scan finds them", async () => {
    await c().createVm({ vm: "d", vcpus: 1, memslots: [{ slot: 0, guestPhysAddr: BASE, memorySize: BigInt(MiB) }] });
    await write("d", 1n); // mapped writable before logging
    await dbmOn(c(), "d");
    await setLog("d", true);
    const clean = await tr("d", 1n);
    assert.deepEqual([clean.dbm, clean.writable], [true, false], "writable-clean");
    assert.equal((await tr("d", 2n)).mapped, false);
    const w = await write("d", 1n, 5n);
    assert.deepEqual([w.fault, w.logged], [FaultKind.FAULT_KIND_UNSPECIFIED, false], "a hardware update, no fault, nothing logged yet");
    assert.deepEqual([(await tr("d", 1n)).writable, (await tr("d", 1n)).dbm], [true, true], "writable-dirty");
    const first = await write("d", 2n);
    assert.deepEqual([first.fault, first.logged], [FaultKind.FAULT_KIND_TRANSLATION, true], "never writable: the first write faults");
    const g = await c().getDirtyLog({ vm: "d", slot: 0 });
    assert.deepEqual([bit(g.bitmap, 1), bit(g.bitmap, 2), g.pagesSynced], [1, 1, 1n]);
    assert.deepEqual([(await tr("d", 1n)).writable, (await tr("d", 2n)).dbm], [false, true], "re-protected: both now writable-clean");
    const info = (await c().getVm({ vm: "d" })).vm!;
    assert.deepEqual([info.hardwareDirty, info.hardwareDirtyUpdates], [true, 1n]);
  });

  test("an unmap saves hardware dirty state to the log first", async () => {
    await c().createVm({ vm: "u", vcpus: 1, memslots: [{ slot: 0, guestPhysAddr: BASE, memorySize: BigInt(MiB) }] });
    await write("u", 3n);
    await dbmOn(c(), "u");
    await setLog("u", true);
    await write("u", 3n, 9n);
    const un = await c().unmapGpaRange({ vm: "u", gpa: BASE, size: BigInt(MiB) });
    assert.equal(un.dirtySaved, 1n);
    assert.equal((await tr("u", 3n)).mapped, false);
    assert.equal(bit((await c().getDirtyLog({ vm: "u", slot: 0 })).bitmap, 3), 1, "not lost with the descriptor");
    assert.equal((await tr("u", 3n)).content, 9n);
  });

  test("turning hardware dirty logging off saves what descriptors hold, and writes fault again", async () => {
    await c().createVm({ vm: "off", vcpus: 1, memslots: [{ slot: 0, guestPhysAddr: BASE, memorySize: BigInt(MiB) }] });
    await write("off", 4n);
    await dbmOn(c(), "off");
    await setLog("off", true);
    await write("off", 4n, 2n);
    await c().enableCap({ vm: "off", capability: HW, args: [0n] });
    assert.equal((await tr("off", 4n)).dbm, false);
    assert.equal(bit((await c().getDirtyLog({ vm: "off", slot: 0 })).bitmap, 4), 1);
    const w = await write("off", 4n, 3n);
    assert.deepEqual([w.fault, w.logged], [FaultKind.FAULT_KIND_PERMISSION, true]);
  });

  test("CLEAR omits the scan when the log started all set; GET still finds the page", async () => {
    await c().createVm({ vm: "is", vcpus: 1, memslots: [{ slot: 0, guestPhysAddr: BASE, memorySize: BigInt(MiB) }] });
    await write("is", 0n);
    await c().enableCap({ vm: "is", capability: Capability.CAPABILITY_MANUAL_DIRTY_LOG_PROTECT2, args: [3n] });
    await dbmOn(c(), "is");
    await setLog("is", true);
    const all = Buffer.alloc(32, 0xff);
    await c().clearDirtyLog({ vm: "is", slot: 0, firstPage: 0n, numPages: 256, bitmap: all });
    await write("is", 0n, 4n); // hardware update
    const cl = await c().clearDirtyLog({ vm: "is", slot: 0, firstPage: 0n, numPages: 256, bitmap: all });
    assert.equal(cl.pagesCleared, 0n, "no sync inside CLEAR: the bit is not there yet");
    const g = await c().getDirtyLog({ vm: "is", slot: 0 });
    assert.deepEqual([bit(g.bitmap, 0), g.pagesSynced], [1, 1n]);
  });

  test("bad input", async () => {
    await c().createVm({ vm: "bad", vcpus: 1 });
    await assert.rejects(c().enableCap({ vm: "bad", capability: HW, args: [2n] }), (e: { code: number; details: string }) => e.code === status.INVALID_ARGUMENT && /EINVAL/.test(e.details));
    await c().createVm({ vm: "bad-ring", vcpus: 1, dirtyRing: { capability: Capability.CAPABILITY_DIRTY_LOG_RING_ACQ_REL, bytes: 65536n } });
    await assert.rejects(c().enableCap({ vm: "bad-ring", capability: HW, args: [1n] }), (e: { code: number; details: string }) => e.code === status.FAILED_PRECONDITION && /dirty rings/.test(e.details));
    await assert.rejects(c().unmapGpaRange({ vm: "bad", gpa: 5n, size: 4096n }), (e: { code: number }) => e.code === status.INVALID_ARGUMENT);
    assert.equal((await c().checkExtension({ capability: HW })).value, 1n);
  });
});

describe("the DBM and page-tracking-device assists on their own", () => {
  test("DBM: the descriptors are the log, so recording costs nothing and the arch sync scans them into the bitmap", async () => {
    const { DbmScan } = await import("../model/dbm.js");
    const { Memslot } = await import("../model/memslot.js");
    const { DEFAULT_COSTS } = await import("../model/cost-model.js");
    const slot = new Memslot(0, GiB, 64 * 4096, 1, 0x80000000);
    slot.dirtyBitmap = new Int32Array(2);
    for (const p of [3, 40]) slot.s2.mapPage(p, 0x4c3 | 0x80); // valid, S2AP R/W, AF: writable-dirty
    const dbm = new DbmScan(DEFAULT_COSTS);
    assert.deepEqual([dbm.dbmOnProtect, dbm.dbmOnFault, dbm.recorded()], [true, false, 0]);
    const r = dbm.sync(slot);
    assert.deepEqual([r.pages, r.hostNs], [2, 64 * DEFAULT_COSTS.dbmScanPteNs]);
    assert.deepEqual([bit(new Uint8Array(slot.dirtyBitmap.buffer), 3), bit(new Uint8Array(slot.dirtyBitmap.buffer), 40)], [1, 1]);
    assert.equal(dbm.sync(slot).pages, 0, "found once");
  });

  test("the device assist hands the GPA of every fault-free write to the driver's sink, and its sync is the driver's", async () => {
    const { DeviceAssist } = await import("../model/page-tracking-device.js");
    const seen: [number, number][] = [];
    const dev = new DeviceAssist((vcpu, gpa) => seen.push([vcpu, gpa]));
    assert.deepEqual([dev.dbmOnProtect, dev.dbmOnFault], [false, true]);
    assert.equal(dev.recorded({ index: 2 } as never, null as never, 0, 0x40001), 0);
    assert.deepEqual(seen, [[2, 0x40001 * 4096]]);
    assert.deepEqual(dev.sync(), { pages: 0, hostNs: 0 });
  });
});
