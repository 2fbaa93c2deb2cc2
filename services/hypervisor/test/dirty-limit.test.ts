/**
 * QEMU's dirty limit: the adjustment rule on its own, then over gRPC a
 * vCPU held at its limit by sleeping after each full ring while its twin
 * runs free, the query's fields and metrics, and bad input refused.
 */
import assert from "node:assert/strict";
import { status } from "@grpc/grpc-js";
import { after, before, describe, test } from "node:test";
import { Capability, ExitReason, MemslotFlag, WorkloadPattern } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { rejects } from "../../../tests/grpc-assert.js";
import { GiB, metric, startHypervisor, type RunningHypervisor } from "../../../tests/hypervisor-harness.js";
import type { HypervisorClient } from "../client.js";
import { DirtyLimiter } from "../model/dirty-limit.js";
import type { Vcpu } from "../model/vcpu.js";

const RING_ENTRIES = 4096; // 16 MiB of pages per full ring

describe("the adjustment on its own (dirtylimit_set_throttle)", () => {
  const vcpu = (quota: number) => ({ paused: false, total: { pagesDirtied: 0 }, dirtyLimit: { quotaMBps: quota, currentMBps: 0, throttleUsPerFull: 0, pagesAt: 0 } }) as unknown as Vcpu;
  /** One period of 1 s in which v dirtied mb MiB. */
  const period = (l: DirtyLimiter, v: Vcpu, mb: number, t: number) => {
    (v.total as { pagesDirtied: number }).pagesDirtied += mb * 256;
    l.tick([v], t);
    return v.dirtyLimit!;
  };

  test("a 40% error moves the sleep by a tenth of the ring-full time; over 50% it moves by full x pct/(100 - pct); within 25 MB/s nothing moves", () => {
    const l = new DirtyLimiter(1000, 0, RING_ENTRIES);
    const v = vcpu(300);
    let s = period(l, v, 500, 1e9);
    assert.equal(s.currentMBps, 500);
    assert.equal(l.ringFullTimeUs(0), 32_000, "16 MiB at the 500 MB/s seen: 32 ms");
    assert.equal(s.throttleUsPerFull, 3_200, "(500 - 300) / 500 = 40%: a tenth of 32 ms");
    s = period(l, v, 1000, 2e9);
    assert.equal(l.ringFullTimeUs(0), 16_000, "the highest rate seen now is 1000 MB/s");
    assert.equal(s.throttleUsPerFull, 3_200 + Math.floor((16_000 * 70) / 30), "70% over: linear");
    const before = s.throttleUsPerFull;
    s = period(l, v, 320, 3e9);
    assert.equal(s.throttleUsPerFull, before, "320 is within 25 MB/s of 300");
    s = period(l, v, 0, 4e9);
    assert.equal(s.throttleUsPerFull, 0, "a vCPU that dirtied nothing sleeps no more");
  });
});

describe("SetVcpuDirtyLimit over gRPC", () => {
  let h: RunningHypervisor;
  before(async () => (h = await startHypervisor()));
  after(() => h.close());
  const c = (): HypervisorClient => h.client;

  /** Two vCPUs writing 128k new pages/s each (500 MB/s) over 1 GiB, their ring logging. */
  const create = (vm: string, ring = true) =>
    c().createVm({
      vm,
      vcpus: 2,
      seed: 3n,
      dirtyRing: ring ? { capability: Capability.CAPABILITY_DIRTY_LOG_RING_ACQ_REL, bytes: BigInt(RING_ENTRIES * 16) } : undefined,
      memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(GiB), flags: MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES }],
      workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, writesPerSecond: 128_000 },
    });

  /**
   * QEMU's vCPU threads and stat thread around KVM: a vCPU out on a full ring
   * has its own ring reaped (kvm_cpu_exec under dirty limit), and every
   * period all rings are (the stat thread's log sync). Returns each vCPU's
   * pages harvested per second over the last `measure` seconds.
   */
  async function drive(vm: string, seconds: number, measure: number): Promise<number[]> {
    const stepNs = 2_000_000;
    const counts = [0, 0];
    const reap = async (vcpus: number[], count: boolean) => {
      for (const i of vcpus) for (let r; (r = await c().harvestDirtyRing({ vm, vcpu: i })).count > 0; ) if (count) counts[i] += r.count;
      await c().resetDirtyRings({ vm });
    };
    for (let t = 0; t < seconds * 1e9; t += stepNs) {
      const counting = t >= (seconds - measure) * 1e9;
      const a = await c().advanceVm({ vm, durationNs: BigInt(stepNs) });
      const full = a.vcpus.filter((v) => v.exits.some((e) => e.reason === ExitReason.EXIT_REASON_DIRTY_RING_FULL)).map((v) => v.vcpu);
      if (full.length > 0) await reap(full, counting);
      if ((t + stepNs) % 1e9 === 0) await reap([0, 1], counting);
    }
    return counts.map((n) => (n * 4096) / 2 ** 20 / measure);
  }

  test("a vCPU limited to 300 MB/s settles within 10% of it, sleeping after full rings, while its twin dirties freely", async () => {
    await create("dl");
    const set = await c().setVcpuDirtyLimit({ vm: "dl", vcpus: [0], dirtyRateMbps: 300n });
    assert.deepEqual(set.vm!.vcpus.map((v) => Number(v.dirtyLimitMbps)), [300, 0]);
    const rates = await drive("dl", 12, 4);
    assert.ok(Math.abs(rates[0] - 300) <= 30, `limited vCPU dirtied ${rates[0].toFixed(0)} MB/s`);
    assert.ok(rates[1] > 350, `free vCPU dirtied ${rates[1].toFixed(0)} MB/s (limited: ${rates[0].toFixed(0)})`);
    const q = await c().queryVcpuDirtyLimit({ vm: "dl" });
    assert.equal(q.limits.length, 1);
    assert.equal(q.limits[0].cpuIndex, 0);
    assert.equal(q.limits[0].limitRate, 300n);
    assert.ok(Math.abs(Number(q.limits[0].currentRate) - 300) <= 30, `query's current-rate ${q.limits[0].currentRate}`);
    assert.ok(q.throttleTimePerRoundUs > 0n && q.throttleTimePerRoundUs === q.limits[0].throttleUsPerFull);
    assert.ok(q.ringFullTimeUs > 0n);
    assert.equal(q.periodMs, 1000);
    const info = (await c().getVm({ vm: "dl" })).vm!;
    assert.ok(info.vcpus[0].dirtyLimitSleepNs > 1_000_000_000n, `slept ${info.vcpus[0].dirtyLimitSleepNs} ns`);
    assert.equal(info.vcpus[1].dirtyLimitSleepNs, 0n);
    assert.equal(await metric(h.httpPort, /^hypervisor_vcpu_dirty_limit_bytes_per_second\{vm="dl",vcpu="0"\}/), 300 * 2 ** 20);
    assert.ok((await metric(h.httpPort, /^hypervisor_vcpu_dirty_limit_sleep_seconds_total\{vm="dl",vcpu="0"\}/)) > 1);
    // Cancelled: the stat thread ends and the vCPU runs free again.
    await c().setVcpuDirtyLimit({ vm: "dl", dirtyRateMbps: 0n });
    assert.deepEqual((await c().queryVcpuDirtyLimit({ vm: "dl" })).limits, []);
    const free = await drive("dl", 2, 1);
    assert.ok(free[0] > 350, `after cancel vCPU 0 dirtied ${free[0].toFixed(0)} MB/s`);
  });

  test("refused: no dirty ring (as QEMU refuses it), a bad vCPU, a period outside 1-1000 ms", async () => {
    await create("dl-noring", false);
    await rejects(c().setVcpuDirtyLimit({ vm: "dl-noring", dirtyRateMbps: 1n }), status.FAILED_PRECONDITION, /requires KVM with accelerator property 'dirty-ring-size' set/);
    await create("dl-bad");
    await rejects(c().setVcpuDirtyLimit({ vm: "dl-bad", vcpus: [2], dirtyRateMbps: 1n }), status.INVALID_ARGUMENT, /vCPU 2/);
    await rejects(c().setVcpuDirtyLimit({ vm: "dl-bad", dirtyRateMbps: 1n, periodMs: 1001 }), status.INVALID_ARGUMENT, /x-vcpu-dirty-limit-period 1001 ms must be in \[1, 1000\]/);
    await rejects(c().queryVcpuDirtyLimit({ vm: "nope" }), status.NOT_FOUND, /nope/);
  });
});
