/**
 * The cost model gives back the measurements it was fitted to
 * (calibration.ts): each figure is a whole ioctl, rebuilt here from the
 * model's parts through the RPCs, so that no part is counted twice (a
 * nothing-dirty GET that also pays the copy, a CLEAR that pays its TLB flush
 * on top of a figure that includes it). Two hosts: the reference host of
 * shared/reference/real-kvm-measurements.md (the defaults), and one that
 * `calibrate` measured, whose exits cost eight times as much.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { Arch, BackingPageSize, Capability, ManualProtectFlag, MemslotFlag, WorkloadPattern } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { readFileSync } from "node:fs";
import { fitCostModel, hostFromHarness, REFERENCE_HOST } from "../model/calibration.js";
import { DEFAULT_COSTS } from "../model/cost-model.js";
import { GiB, startHypervisor, type RunningHypervisor } from "../../../tests/hypervisor-harness.js";

const LOG = MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES;

/** What kvm-harness measured on a 256 MiB slot of a host of this machine kind (2026-12-01, 3 repetitions). */
const MEASURED_HOST = hostFromHarness(JSON.parse(readFileSync(new URL("fixtures/kvm-harness-256mib.json", import.meta.url), "utf8")));

test("the defaults are the reference host's fit", () => {
  const fit = fitCostModel(REFERENCE_HOST);
  for (const [k, v] of Object.entries(fit)) assert.equal(DEFAULT_COSTS[k as keyof typeof DEFAULT_COSTS], v, k);
  assert.ok(Math.abs(fit.ioctlNs - 236) < 1 && Math.abs(fit.tlbFlushNs - 500) < 2, `the ioctl ${fit.ioctlNs} ns and its flush ${fit.tlbFlushNs} ns`);
  assert.equal(fit.faultSerialNs, 1425);
});

test("measurements the model cannot produce are refused, naming the part; a report without a series names it", () => {
  assert.throws(() => fitCostModel({ ...REFERENCE_HOST, getAllDirtyNs: 1000 }), /contradict the cost model: getPageWriteProtectNs = -/);
  const report = JSON.parse(readFileSync(new URL("fixtures/kvm-harness-256mib.json", import.meta.url), "utf8"));
  delete report.measurements.ring_reset_ns_per_entry;
  assert.throws(() => hostFromHarness(report), /no 'ring_reset_ns_per_entry'/);
});

for (const [host, m] of [["the reference host", REFERENCE_HOST], ["a calibrated host", MEASURED_HOST]] as const) describe(`the cost model against the measurements it was fitted to: ${host}`, () => {
  const size = m.pages * 4096;
  const costs = { ...DEFAULT_COSTS, ...fitCostModel(m) };
  const pass = BigInt(Math.ceil(m.pages * (Math.max(m.firstTouchNsPerPage ?? 0, m.writeFaultNsPerPage) + 100) * 1.1)); // long enough to write every page
  let h: RunningHypervisor;
  before(async () => (h = await startHypervisor({ costs })));
  after(() => h.close());
  const c = () => h.client;
  const within = (got: bigint | number, want: number, what: string) => assert.ok(Math.abs(Number(got) - want) / want < 0.02, `${what}: model ${Number(got)} ns, measured ${want} ns`);

  /** A 1 GiB VM whose every page is mapped and, with logging on, dirty. */
  async function vm(name: string, manual: boolean) {
    await c().createVm({ vm: name, vcpus: 1, memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(size) }], workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: 1e9 } });
    await c().advanceVm({ vm: name, durationNs: pass }); // every page mapped
    await c().pauseVm({ vm: name });
    if (manual) await c().enableCap({ vm: name, capability: Capability.CAPABILITY_MANUAL_DIRTY_LOG_PROTECT2, args: [BigInt(ManualProtectFlag.MANUAL_PROTECT_FLAG_MANUAL_PROTECT_ENABLE)] });
  }

  test("GET with nothing, every page and one page a word dirty; enable and disable logging", async () => {
    await vm("cal-get", false);
    const on = await c().setUserMemoryRegion({ vm: "cal-get", memslot: { slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(size), flags: LOG } });
    within(on.hostNs, m.enableLoggingNs, "enable logging");
    await c().resumeVm({ vm: "cal-get" });
    await c().advanceVm({ vm: "cal-get", durationNs: pass }); // every page dirty
    await c().pauseVm({ vm: "cal-get" });
    within((await c().getDirtyLog({ vm: "cal-get", slot: 0 })).hostNs, m.getAllDirtyNs, "GET, every page dirty");
    within((await c().getDirtyLog({ vm: "cal-get", slot: 0 })).hostNs, m.getNoneDirtyNs, "GET, no page dirty");
    if (m.getSparseNs !== undefined) {
      await c().resumeVm({ vm: "cal-get" });
      await c().guestWrite({ vm: "cal-get", writes: Array.from({ length: m.pages / 64 }, (_, i) => ({ vcpu: 0, gpa: BigInt(GiB + i * 64 * 4096), value: 7n })) });
      await c().pauseVm({ vm: "cal-get" });
      within((await c().getDirtyLog({ vm: "cal-get", slot: 0 })).hostNs, m.getSparseNs, "GET, one dirty page in each word (a masked-protect call each)");
    }
    const off = await c().setUserMemoryRegion({ vm: "cal-get", memslot: { slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(size), flags: 0 } });
    within(off.hostNs, m.disableLoggingNs, "disable logging");
  });

  test("enabling logging walks the slot's pages and protects mapped entries: a never-touched slot costs the walk and the flush, a 2 MiB block is one entry", async () => {
    const slot = (flags: number) => ({ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(size), flags });
    await c().createVm({ vm: "cal-fresh", vcpus: 1, memslots: [slot(0)] });
    const fresh = await c().setUserMemoryRegion({ vm: "cal-fresh", memslot: slot(LOG) });
    const walk = m.pages * costs.loggingWalkPageNs;
    assert.ok(Math.abs(Number(fresh.hostNs) - (walk + costs.tlbFlushNs)) <= 1, `nothing mapped, nothing to protect: ${fresh.hostNs} ns`);
    if (m.enableLoggingSparseNs !== undefined) {
      await c().createVm({ vm: "cal-eighth", vcpus: 1, memslots: [slot(0)] });
      await c().guestWrite({ vm: "cal-eighth", writes: Array.from({ length: m.pages / 8 }, (_, i) => ({ vcpu: 0, gpa: BigInt(GiB + i * 8 * 4096), value: 1n })) });
      within((await c().setUserMemoryRegion({ vm: "cal-eighth", memslot: slot(LOG) })).hostNs, m.enableLoggingSparseNs, "one page in 8 mapped: every line of descriptors, an eighth of the entries");
    }
    await c().createVm({ vm: "cal-2m", vcpus: 1, backingPageSize: BackingPageSize.BACKING_PAGE_SIZE_2M, memslots: [slot(0)], workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: 1e9 } });
    await c().advanceVm({ vm: "cal-2m", durationNs: 100_000_000n });
    await c().pauseVm({ vm: "cal-2m" });
    const mapped = (await c().getVm({ vm: "cal-2m" })).vm!.memslots[0];
    assert.equal(mapped.mappedBlocks2m, BigInt(size / 2 ** 21));
    const blocks = await c().setUserMemoryRegion({ vm: "cal-2m", memslot: slot(LOG) });
    within(Number(blocks.hostNs), m.enableLoggingThpNs ?? walk + (size / 2 ** 21) * costs.enableLoggingPageNs + costs.tlbFlushNs, "each block write-protected as one entry (arm64: no eager split by default)");
  });

  test("x86: logging off over THP zaps the split leaves, and the next faults map the blocks again", async () => {
    const slot = (flags: number) => ({ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(size), flags });
    const blocks = BigInt(size / 2 ** 21);
    await c().createVm({ vm: "cal-thp", vcpus: 1, arch: Arch.ARCH_X86_64, eagerPageSplit: false, backingPageSize: BackingPageSize.BACKING_PAGE_SIZE_2M, memslots: [slot(0)], workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: 1e9 } });
    const info = async () => (await c().getVm({ vm: "cal-thp" })).vm!.memslots[0];
    await c().advanceVm({ vm: "cal-thp", durationNs: pass });
    assert.equal((await info()).mappedBlocks2m, blocks);
    await c().setUserMemoryRegion({ vm: "cal-thp", memslot: slot(LOG) });
    await c().advanceVm({ vm: "cal-thp", durationNs: pass }); // every page written while logging: every block split
    assert.equal((await info()).mappedPages4k, BigInt(m.pages));
    await c().pauseVm({ vm: "cal-thp" });
    const off = await c().setUserMemoryRegion({ vm: "cal-thp", memslot: slot(0) });
    within(off.hostNs, m.disableLoggingThpNs ?? m.disableLoggingNs + m.pages * costs.collapseZapEntryNs + costs.tlbFlushNs, "disable logging over THP after a logging pass");
    assert.equal((await info()).mappedPages4k, 0n, "the leaves are zapped");
    await c().resumeVm({ vm: "cal-thp" });
    await c().advanceVm({ vm: "cal-thp", durationNs: pass });
    assert.equal((await info()).mappedBlocks2m, blocks, "faults mapped the blocks again");
  });

  test("manual protect: GET of every page dirty, CLEAR of the whole slot and of one 64-page chunk", async () => {
    await vm("cal-manual", true);
    await c().setUserMemoryRegion({ vm: "cal-manual", memslot: { slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(size), flags: LOG } });
    const dirtyAll = async () => {
      await c().resumeVm({ vm: "cal-manual" });
      await c().advanceVm({ vm: "cal-manual", durationNs: pass });
      await c().pauseVm({ vm: "cal-manual" });
    };
    await dirtyAll();
    const g = await c().getDirtyLog({ vm: "cal-manual", slot: 0 });
    within(g.hostNs, m.manualGetAllDirtyNs, "manual GET, every page dirty");
    const pages = Number(g.dirtyPages);
    assert.equal(pages, m.pages);
    within((await c().clearDirtyLog({ vm: "cal-manual", slot: 0, firstPage: 0n, numPages: pages, bitmap: g.bitmap })).hostNs, m.clearSlotNs, "CLEAR of the whole slot");
    await dirtyAll();
    const again = await c().getDirtyLog({ vm: "cal-manual", slot: 0 });
    within((await c().clearDirtyLog({ vm: "cal-manual", slot: 0, firstPage: 0n, numPages: 64, bitmap: again.bitmap.subarray(0, 8) })).hostNs, m.clear64PagesNs, "CLEAR of one 64-page chunk");
  });
});
