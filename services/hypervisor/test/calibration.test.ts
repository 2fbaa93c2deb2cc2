/**
 * The cost model gives back the measurements it was derived from: each
 * [KVM-HERE] figure of shared/reference/real-kvm-measurements.md is a whole
 * ioctl, rebuilt here from the model's parts through the RPCs, so that no
 * part is counted twice (a nothing-dirty GET that also pays the copy, a
 * CLEAR that pays its TLB flush on top of a figure that includes it).
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { BackingPageSize, Capability, ManualProtectFlag, MemslotFlag, WorkloadPattern } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { DEFAULT_COSTS } from "../model/cost-model.js";
import { GiB, startHypervisor, type RunningHypervisor } from "../../../tests/hypervisor-harness.js";

const LOG = MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES;

describe("the cost model against the measurements it came from (1 GiB slot)", () => {
  let h: RunningHypervisor;
  before(async () => (h = await startHypervisor()));
  after(() => h.close());
  const c = () => h.client;
  const within = (got: bigint | number, want: number, what: string) => assert.ok(Math.abs(Number(got) - want) / want < 0.02, `${what}: model ${Number(got)} ns, measured ${want} ns`);

  /** A 1 GiB VM whose every page is mapped and, with logging on, dirty. */
  async function vm(name: string, manual: boolean) {
    await c().createVm({ vm: name, vcpus: 1, memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(GiB) }], workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: 1e9 } });
    await c().advanceVm({ vm: name, durationNs: 1_000_000_000n }); // every page mapped
    await c().pauseVm({ vm: name });
    if (manual) await c().enableCap({ vm: name, capability: Capability.CAPABILITY_MANUAL_DIRTY_LOG_PROTECT2, args: [BigInt(ManualProtectFlag.MANUAL_PROTECT_FLAG_MANUAL_PROTECT_ENABLE)] });
  }

  test("GET: nothing dirty 0.011 ms, every page dirty 7.9 ms; enable 10.3 ms, disable 11.2 ms", async () => {
    await vm("cal-get", false);
    const on = await c().setUserMemoryRegion({ vm: "cal-get", memslot: { slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(GiB), flags: LOG } });
    within(on.hostNs, 10.3e6, "enable logging");
    await c().resumeVm({ vm: "cal-get" });
    await c().advanceVm({ vm: "cal-get", durationNs: 1_000_000_000n }); // every page dirty
    await c().pauseVm({ vm: "cal-get" });
    within((await c().getDirtyLog({ vm: "cal-get", slot: 0 })).hostNs, 7.9e6, "GET, every page dirty");
    within((await c().getDirtyLog({ vm: "cal-get", slot: 0 })).hostNs, 0.011e6, "GET, no page dirty");
    const off = await c().setUserMemoryRegion({ vm: "cal-get", memslot: { slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(GiB), flags: 0 } });
    within(off.hostNs, 11.2e6, "disable logging");
  });

  test("enabling logging walks mapped entries: a never-touched slot costs the flush only, a 2 MiB block is one entry", async () => {
    const slot = (flags: number) => ({ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(GiB), flags });
    await c().createVm({ vm: "cal-fresh", vcpus: 1, memslots: [slot(0)] });
    const fresh = await c().setUserMemoryRegion({ vm: "cal-fresh", memslot: slot(LOG) });
    assert.ok(Number(fresh.hostNs) <= DEFAULT_COSTS.tlbFlushNs, `nothing mapped, nothing to protect: ${fresh.hostNs} ns`);
    await c().createVm({ vm: "cal-2m", vcpus: 1, backingPageSize: BackingPageSize.BACKING_PAGE_SIZE_2M, memslots: [slot(0)], workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: 1e9 } });
    await c().advanceVm({ vm: "cal-2m", durationNs: 100_000_000n });
    await c().pauseVm({ vm: "cal-2m" });
    const mapped = (await c().getVm({ vm: "cal-2m" })).vm!.memslots[0];
    assert.equal(mapped.mappedBlocks2m, 512n);
    const blocks = await c().setUserMemoryRegion({ vm: "cal-2m", memslot: slot(LOG) });
    within(Number(blocks.hostNs), 512 * DEFAULT_COSTS.enableLoggingPageNs + DEFAULT_COSTS.tlbFlushNs, "512 blocks write-protected as 512 entries (arm64: no eager split by default)");
  });

  test("manual protect: GET of every page dirty 0.015 ms, CLEAR of the whole slot 6.4 ms, CLEAR of one 64-page chunk 2.3 us", async () => {
    await vm("cal-manual", true);
    await c().setUserMemoryRegion({ vm: "cal-manual", memslot: { slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(GiB), flags: LOG } });
    const dirtyAll = async () => {
      await c().resumeVm({ vm: "cal-manual" });
      await c().advanceVm({ vm: "cal-manual", durationNs: 1_000_000_000n });
      await c().pauseVm({ vm: "cal-manual" });
    };
    await dirtyAll();
    const g = await c().getDirtyLog({ vm: "cal-manual", slot: 0 });
    within(g.hostNs, 0.015e6, "manual GET, every page dirty");
    const pages = Number(g.dirtyPages);
    assert.equal(pages, GiB / 4096);
    within((await c().clearDirtyLog({ vm: "cal-manual", slot: 0, firstPage: 0n, numPages: pages, bitmap: g.bitmap })).hostNs, 6.4e6, "CLEAR of the whole slot");
    await dirtyAll();
    const again = await c().getDirtyLog({ vm: "cal-manual", slot: 0 });
    within((await c().clearDirtyLog({ vm: "cal-manual", slot: 0, firstPage: 0n, numPages: 64, bitmap: again.bitmap.subarray(0, 8) })).hostNs, 2300, "CLEAR of one 64-page chunk");
  });
});
