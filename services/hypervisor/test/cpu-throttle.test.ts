/**
 * QEMU's vCPU throttle: the timer arithmetic on its own, then over gRPC a
 * throttled vCPU doing (100 - pct)% of an unthrottled twin's writes, its
 * sleep reported, and bad input refused.
 */
import assert from "node:assert/strict";
import { status } from "@grpc/grpc-js";
import { after, before, describe, test } from "node:test";
import { WorkloadPattern } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { GiB, metric, MiB, startHypervisor, type RunningHypervisor } from "../../../tests/hypervisor-harness.js";
import { rejects } from "../../../tests/grpc-assert.js";
import { CPU_THROTTLE_TIMESLICE_NS, CpuThrottle } from "../model/cpu-throttle.js";

describe("the throttle timer on its own", () => {
  test("20%: each 12.5 ms period sleeps 2.5 ms, then runs one 10 ms timeslice; 99%: 990 ms asleep per second", () => {
    const th = new CpuThrottle(20, 1_000);
    assert.equal(th.periodNs, 12_500_000);
    assert.equal(th.sleepNs, 2_500_000);
    assert.deepEqual(th.phase(1_000), { asleep: true, until: 2_501_000 });
    assert.deepEqual(th.phase(2_501_000), { asleep: false, until: 12_501_000 });
    assert.deepEqual(th.phase(12_501_000), { asleep: true, until: 15_001_000 });
    const max = new CpuThrottle(99, 0);
    assert.equal(Math.round(max.periodNs), 1e9);
    assert.equal(Math.round(max.periodNs - max.sleepNs), CPU_THROTTLE_TIMESLICE_NS, "one timeslice of running per period");
  });
});

describe("SetCpuThrottle over gRPC", () => {
  let h: RunningHypervisor;
  before(async () => (h = await startHypervisor()));
  after(() => h.close());
  const c = () => h.client;
  const twin = async (vm: string) => {
    await c().createVm({
      vm,
      vcpus: 2,
      seed: 9n,
      memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(16 * MiB) }],
      workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, writesPerSecond: 1e6 },
    });
    await c().advanceVm({ vm, durationNs: 100_000_000n }); // every page mapped: no faults from here on
  };

  for (const pct of [20, 50, 90]) {
    test(`${pct}%: the throttled vCPU does ${100 - pct}% of its twin's writes and sleeps ${pct}% of the time`, async () => {
      await twin(`free-${pct}`);
      await twin(`thr-${pct}`);
      const set = await c().setCpuThrottle({ vm: `thr-${pct}`, vcpus: [1], percentage: pct });
      assert.deepEqual(set.vm!.vcpus.map((v) => v.cpuThrottlePercentage), [0, pct]);
      const second = 1_000_000_000n;
      await c().advanceVm({ vm: `free-${pct}`, durationNs: second });
      await c().advanceVm({ vm: `thr-${pct}`, durationNs: second });
      const free = (await c().getVm({ vm: `free-${pct}` })).vm!;
      const thr = (await c().getVm({ vm: `thr-${pct}` })).vm!;
      const ratio = thr.vcpus[1].achievedWritesPerSecond / free.vcpus[1].achievedWritesPerSecond;
      assert.ok(Math.abs(ratio - (100 - pct) / 100) < 0.01, `write ratio ${ratio}`);
      assert.equal(thr.vcpus[0].achievedWritesPerSecond, free.vcpus[0].achievedWritesPerSecond, "the other vCPU is not throttled");
      assert.ok(Math.abs(Number(thr.vcpus[1].cpuThrottleNs) - pct * 1e7) <= 1e7 * 0.5, `slept ${thr.vcpus[1].cpuThrottleNs} ns`);
      assert.equal(await metric(h.httpPort, new RegExp(`^hypervisor_vcpu_cpu_throttle_percentage\\{vm="thr-${pct}",vcpu="1"\\}`)), pct);
    });
  }

  test("0 stops it; bad input by status code", async () => {
    await twin("stop");
    await c().setCpuThrottle({ vm: "stop", percentage: 50 });
    const off = await c().setCpuThrottle({ vm: "stop", percentage: 0 });
    assert.deepEqual(off.vm!.vcpus.map((v) => v.cpuThrottlePercentage), [0, 0]);
    await rejects(c().setCpuThrottle({ vm: "stop", percentage: 100 }), status.INVALID_ARGUMENT, /percentage 100 must be 0 \(off\) or 1-99.*EINVAL/);
    await rejects(c().setCpuThrottle({ vm: "stop", vcpus: [5], percentage: 10 }), status.INVALID_ARGUMENT, /no vCPU 5/);
    await rejects(c().setCpuThrottle({ vm: "ghost", percentage: 10 }), status.NOT_FOUND, /no VM named 'ghost'/);
  });
});
