/**
 * calc-dirty-rate in its three modes against a workload whose dirty rate is
 * known: one vCPU writing 20,000 new pages a second (sequential, no page
 * twice within the measurement) dirties 78.125 MiB/s.
 */
import assert from "node:assert/strict";
import { status } from "@grpc/grpc-js";
import { after, before, describe, test } from "node:test";
import { Capability, ClockDrive, DirtyRateMode, DirtyRateStatus, MemslotFlag, WorkloadPattern } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { rejects } from "../../../tests/grpc-assert.js";
import { GiB, startHypervisor, type RunningHypervisor } from "../../../tests/hypervisor-harness.js";

const PAGES_PER_S = 20_000;
const TRUE_MIBPS = (PAGES_PER_S * 4096) / 2 ** 20;
const slot = (flags = 0) => ({ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(GiB), flags });

describe("calc-dirty-rate", () => {
  let h: RunningHypervisor;
  before(async () => (h = await startHypervisor()));
  after(() => h.close());
  const c = () => h.client;

  /** A VM whose every page is mapped, then writing 20,000 pages/s per vCPU. */
  async function vm(name: string, vcpus = 1, ring = false) {
    await c().createVm({
      vm: name,
      vcpus,
      seed: 5n,
      memslots: [slot()],
      dirtyRing: ring ? { capability: Capability.CAPABILITY_DIRTY_LOG_RING_ACQ_REL, bytes: BigInt(65536 * 16) } : undefined,
      workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: 1e9 },
    });
    await c().advanceVm({ vm: name, durationNs: 1_000_000_000n });
    await c().setWorkload({ vm: name, workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: PAGES_PER_S } });
    await c().advanceVm({ vm: name, durationNs: 100_000_000n });
  }
  const calc = (name: string, mode: DirtyRateMode, calcTimeMs = 1000) => c().calcDirtyRate({ vm: name, calcTimeMs, mode }).then((r) => r.info!);

  test("query before any measurement: unstarted", async () => {
    await c().createVm({ vm: "dr-none", vcpus: 1, memslots: [slot()] });
    assert.equal((await c().queryDirtyRate({ vm: "dr-none" })).info!.status, DirtyRateStatus.DIRTY_RATE_STATUS_UNSTARTED);
  });

  test("dirty-bitmap counts the pages exactly, turns logging off again, and query returns the same answer", async () => {
    await vm("dr-bitmap");
    const clock = (await c().getVm({ vm: "dr-bitmap" })).vm!.clockNs;
    const i = await calc("dr-bitmap", DirtyRateMode.DIRTY_RATE_MODE_DIRTY_BITMAP);
    assert.equal(i.status, DirtyRateStatus.DIRTY_RATE_STATUS_MEASURED);
    // Every page the guest wrote, exactly: fewer than 20,000, since each write now also faults (2.43 us a 50 us interval).
    assert.ok(Math.abs(Number(i.dirtyPages) - i.guestWritesPerSecondDuring) <= 2, `${i.dirtyPages} pages, ${i.guestWritesPerSecondDuring} writes`);
    assert.ok(i.guestWritesPerSecondDuring < i.guestWritesPerSecondBefore);
    assert.ok(Math.abs(Number(i.dirtyRate) - TRUE_MIBPS) / TRUE_MIBPS < 0.1, `${i.dirtyRate} MiB/s`);
    assert.equal(i.dirtyRate, BigInt(Math.floor((Number(i.dirtyPages) * 4096) / 2 ** 20)), "QEMU's integer MiB/s of the pages over 1 s");
    assert.equal(i.samplePages, 0);
    const after = (await c().getVm({ vm: "dr-bitmap" })).vm!;
    assert.equal(after.clockNs - clock, 1_000_000_000n, "the guest ran for calc_time");
    assert.equal(after.memslots[0].logging, false, "logging is off again");
    assert.deepEqual((await c().queryDirtyRate({ vm: "dr-bitmap" })).info, i);
  });

  test("page-sampling measures within its sampling error and costs the guest nothing", async () => {
    await vm("dr-sample");
    const i = await calc("dr-sample", DirtyRateMode.DIRTY_RATE_MODE_PAGE_SAMPLING);
    assert.equal(i.samplePages, 512);
    // 512 samples of a slot whose share p of pages is dirtied: the count is binomial.
    const p = PAGES_PER_S / (GiB / 4096);
    const sdMiBps = (Math.sqrt(512 * p * (1 - p)) / 512) * 1024;
    assert.ok(Math.abs(Number(i.dirtyRate) - TRUE_MIBPS) <= 3 * sdMiBps + 1, `${i.dirtyRate} MiB/s against ${TRUE_MIBPS} (sd ${sdMiBps.toFixed(1)})`);
    assert.ok(Math.abs(i.guestWritesPerSecondDuring - i.guestWritesPerSecondBefore) / i.guestWritesPerSecondBefore < 0.01, "no logging, no slowdown");
    assert.equal((await c().getVm({ vm: "dr-sample" })).vm!.memslots[0].logging, false);
  });

  test("dirty-ring gives each vCPU's rate", async () => {
    await vm("dr-ring", 2, true);
    const i = await calc("dr-ring", DirtyRateMode.DIRTY_RATE_MODE_DIRTY_RING);
    assert.equal(i.vcpuDirtyRate.length, 2);
    for (const v of i.vcpuDirtyRate) assert.ok(Math.abs(Number(v.dirtyRate) - TRUE_MIBPS) / TRUE_MIBPS < 0.1, `vCPU ${v.id}: ${v.dirtyRate} MiB/s`);
    assert.ok(Math.abs(Number(i.dirtyRate) - 2 * TRUE_MIBPS) / (2 * TRUE_MIBPS) < 0.1);
  });

  test("a logging mode reports what measuring cost the guest: faults slow a fast writer", async () => {
    await vm("dr-slow");
    await c().setWorkload({ vm: "dr-slow", workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: 500_000 } });
    await c().advanceVm({ vm: "dr-slow", durationNs: 50_000_000n });
    const i = await calc("dr-slow", DirtyRateMode.DIRTY_RATE_MODE_DIRTY_BITMAP, 200);
    assert.ok(i.guestWritesPerSecondBefore > 450_000, `before ${i.guestWritesPerSecondBefore}`);
    assert.ok(i.guestWritesPerSecondDuring < 0.6 * i.guestWritesPerSecondBefore, `during ${i.guestWritesPerSecondDuring}: every write faults while logging`);
  });

  test("while a logging-mode measurement runs it owns the dirty log: other syncs and flag changes are refused until it ends", async () => {
    await c().createVm({ vm: "dr-own", vcpus: 1, clock: ClockDrive.CLOCK_DRIVE_REALTIME, memslots: [slot()], workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, writesPerSecond: 10_000 } });
    const measuring = c().calcDirtyRate({ vm: "dr-own", calcTimeMs: 400, mode: DirtyRateMode.DIRTY_RATE_MODE_DIRTY_BITMAP });
    await new Promise((r) => setTimeout(r, 100));
    assert.equal((await c().queryDirtyRate({ vm: "dr-own" })).info!.status, DirtyRateStatus.DIRTY_RATE_STATUS_MEASURING);
    await rejects(c().getDirtyLog({ vm: "dr-own", slot: 0 }), status.FAILED_PRECONDITION, /GET_DIRTY_LOG: VM dr-own is measuring its dirty rate in mode dirty-bitmap/);
    await rejects(c().setUserMemoryRegion({ vm: "dr-own", memslot: slot(MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES) }), status.FAILED_PRECONDITION, /SET_USER_MEMORY_REGION: VM dr-own is measuring/);
    assert.equal((await measuring).info!.status, DirtyRateStatus.DIRTY_RATE_STATUS_MEASURED);
    await c().setUserMemoryRegion({ vm: "dr-own", memslot: slot(MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES) });
    await c().getDirtyLog({ vm: "dr-own", slot: 0 });
  });

  test("a dirty-ring measurement cut short leaves no vCPU out on a full ring and logging off", async () => {
    await vm("dr-cut", 1, true);
    await c().setWorkload({ vm: "dr-cut", workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, writesPerSecond: 1e7 } });
    await assert.rejects(c().calcDirtyRate({ vm: "dr-cut", calcTimeMs: 60_000, mode: DirtyRateMode.DIRTY_RATE_MODE_DIRTY_RING }, { deadlineMs: 300 }));
    await new Promise((r) => setTimeout(r, 300)); // the server notices the cancellation at its next slice
    const info = (await c().getVm({ vm: "dr-cut" })).vm!;
    assert.equal(info.memslots[0].logging, false);
    assert.equal(info.vcpus[0].dirtyRingEntries, 0, "the rings were reaped");
    assert.equal((await c().queryDirtyRate({ vm: "dr-cut" })).info!.status, DirtyRateStatus.DIRTY_RATE_STATUS_UNSTARTED);
  });

  test("bad input and modes the VM cannot run are refused with precise statuses, and change nothing", async () => {
    await vm("dr-bad");
    const bad = (req: object) => c().calcDirtyRate({ vm: "dr-bad", ...req });
    await rejects(bad({ calcTimeMs: 10 }), status.INVALID_ARGUMENT, /calc_time_ms 10 must be in \[50, 60000\]/);
    await rejects(bad({ samplePages: 64 }), status.INVALID_ARGUMENT, /sample_pages 64 must be in \[128, 16384\]/);
    await rejects(bad({ mode: DirtyRateMode.DIRTY_RATE_MODE_DIRTY_RING }), status.FAILED_PRECONDITION, /mode dirty-ring needs a VM created with dirty rings/);
    await c().setUserMemoryRegion({ vm: "dr-bad", memslot: slot(MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES) });
    await rejects(bad({ mode: DirtyRateMode.DIRTY_RATE_MODE_DIRTY_BITMAP }), status.FAILED_PRECONDITION, /slot 0 of VM dr-bad is logging already \(a migration\?\).*measure with page-sampling/);
    assert.equal((await c().queryDirtyRate({ vm: "dr-bad" })).info!.status, DirtyRateStatus.DIRTY_RATE_STATUS_UNSTARTED);
    // page-sampling works beside a migration's logging.
    assert.equal((await calc("dr-bad", DirtyRateMode.DIRTY_RATE_MODE_PAGE_SAMPLING, 100)).status, DirtyRateStatus.DIRTY_RATE_STATUS_MEASURED);
    await vm("dr-ringbad", 1, true);
    await rejects(c().calcDirtyRate({ vm: "dr-ringbad", mode: DirtyRateMode.DIRTY_RATE_MODE_DIRTY_BITMAP }), status.FAILED_PRECONDITION, /mode dirty-bitmap needs a VM without dirty rings/);
  });
});
