/**
 * QEMU's auto-converge: the trigger and the throttle steps on their own, then
 * a workload that cannot converge without it converges with it, its throttle
 * stepping 20, 30, 40, ... as QEMU's would and the guest slowing with it,
 * and the source never left throttled.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { WorkloadPattern } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { GiB, hypervisorPair, MiB } from "../../../tests/hypervisor-harness.js";
import { migrate, type MigrationError } from "../migrate.js";
import { AutoConverge, checkAutoConverge, QEMU_AUTO_CONVERGE } from "../policies/auto-converge.js";
import { FallbackSyncTimer } from "../fallback-sync.js";
import { htmlReport, jsonReport, textReport } from "../report.js";

const S = 1e9;

describe("auto-converge's trigger on its own", () => {
  test("periods over 1 s; the second high period throttles (the count survives a low one); 20, then +10, capped", () => {
    const ac = new AutoConverge({ ...QEMU_AUTO_CONVERGE, maxCpuThrottle: 45 }, 0);
    const MiB4 = 1024; // pages
    assert.equal(ac.trigger(0.5 * S, 10 * MiB4, 10 * 4 * MiB), null, "a period of 1 s or less is not evaluated");
    assert.equal(ac.trigger(1.5 * S, 10 * MiB4, 20 * 4 * MiB), null, "high once: 80 MiB dirtied > 50% of 80 MiB sent");
    assert.equal(ac.trigger(3 * S, 1, 40 * 4 * MiB), null, "low");
    assert.equal(ac.trigger(4.5 * S, 20 * MiB4, 60 * 4 * MiB), 20, "high twice, not in a row: cpu-throttle-initial");
    assert.equal(ac.trigger(6 * S, 20 * MiB4, 80 * 4 * MiB), null);
    assert.equal(ac.trigger(7.5 * S, 20 * MiB4, 100 * 4 * MiB), 30);
    ac.trigger(9 * S, 20 * MiB4, 120 * 4 * MiB);
    assert.equal(ac.trigger(10.5 * S, 20 * MiB4, 140 * 4 * MiB), 40);
    ac.trigger(12 * S, 20 * MiB4, 160 * 4 * MiB);
    assert.equal(ac.trigger(13.5 * S, 20 * MiB4, 180 * 4 * MiB), 45, "max-cpu-throttle");
  });

  test("tailslow steps at most to the throttle that would bring the dirty rate to the threshold", () => {
    const ac = new AutoConverge({ ...QEMU_AUTO_CONVERGE, cpuThrottleTailslow: true }, 0);
    ac.trigger(1.5 * S, 1000, 4096 * 1000);
    assert.equal(ac.trigger(3 * S, 1000, 2 * 4096 * 1000), 20);
    ac.trigger(4.5 * S, 1100, 3 * 4096 * 1000);
    // cpu_now 80, ideal 80 x (0.5 x 1000 / 1100) = 36: the step would be 44, capped at the increment.
    assert.equal(ac.trigger(6 * S, 1100, 4 * 4096 * 1000), 30);
    ac.trigger(7.5 * S, 530, 5 * 4096 * 1000);
    // cpu_now 70, ideal floor(70 x 500 / 530) = 66: a step of 4.
    assert.equal(ac.trigger(9 * S, 530, 6 * 4096 * 1000), 34);
  });

  test("out-of-range parameters are named", () => {
    assert.match(checkAutoConverge({ ...QEMU_AUTO_CONVERGE, maxCpuThrottle: 100 })!, /max-cpu-throttle must be a whole number in \[1, 99\]/);
    assert.match(checkAutoConverge({ ...QEMU_AUTO_CONVERGE, cpuThrottleInitial: 0 })!, /cpu-throttle-initial/);
    assert.equal(checkAutoConverge(QEMU_AUTO_CONVERGE), null);
  });
});

describe("QEMU's 5 s fallback sync timer on its own", () => {
  test("ticks every 5 s of guest time; syncs only when no sync happened since the previous tick, and never in the first pass", () => {
    const t = new FallbackSyncTimer(0);
    assert.equal(t.tick(4.9e9, 0), false, "not yet 5 s");
    assert.equal(t.tick(5e9, 0), false, "the first pass: QEMU's sync_cnt <= 1");
    assert.equal(t.tick(10e9, 1), false, "a sync since the last tick");
    assert.equal(t.tick(15e9, 1), true, "none since: sync");
    assert.equal(t.tick(20e9, 2), true, "only its own sync since: again");
    assert.equal(t.tick(25e9, 4), false, "a pass's sync since");
  });
});

describe("auto-converge in a migration", () => {
  const pair = hypervisorPair();
  before(() => pair.start());
  after(() => pair.stop());

  /** 256 MiB, all of it written once, then 64 MiB of it rewritten at 400,000 writes/s: over 1 Gbit/s every round finds it all dirty again. */
  const hotVm = async (vm: string) => {
    await pair.src.client.createVm({ vm, vcpus: 4, seed: 3n, memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(256 * MiB) }] });
    await pair.src.client.setWorkload({ vm, workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: 1e7 } });
    await pair.src.client.advanceVm({ vm, durationNs: 1_000_000_000n });
    await pair.src.client.setWorkload({ vm, workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, writesPerSecond: 100_000, workingSetPages: BigInt((64 * MiB) / 4096) } });
  };
  const cfg = (vm: string) => ({ sourceVm: vm, destinationVm: vm, bandwidthBitsPerSecond: 1e9, downtimeLimitMs: 100, completionTimeoutPerGiBS: 1e4 });

  test("without it the workload does not converge; with it the throttle steps 20, 30, 40, ..., the guest slows, and it converges and verifies", async () => {
    await hotVm("no-ac");
    const plain = await migrate({ ...cfg("no-ac"), maxRounds: 30 }, { source: pair.src.client, destination: pair.dst.client });
    assert.equal(plain.switchover?.forced, true, "without auto-converge only the 30-round cap ends it");

    await hotVm("ac");
    const r = await migrate({ ...cfg("ac"), autoConverge: QEMU_AUTO_CONVERGE }, { source: pair.src.client, destination: pair.dst.client });
    assert.equal(r.status, "completed");
    assert.equal(r.verification?.match, true);
    assert.equal(r.switchover?.forced, false, "it converged");
    const steps = [...new Set(r.rounds.map((x) => x.cpuThrottlePercentage).filter((p) => p > 0))];
    assert.deepEqual(steps, Array.from({ length: steps.length }, (_, i) => Math.min(20 + 10 * i, 99)), `throttle steps ${steps}`);
    assert.ok(steps.length >= 2);
    const first = r.rounds[1].guestWritesPerSecond;
    const last = r.rounds.filter((x) => !x.stopAndCopy).at(-1)!;
    assert.ok(last.guestWritesPerSecond < first * (1 - last.cpuThrottlePercentage / 100) * 1.1, `guest ${first} -> ${last.guestWritesPerSecond} writes/s at ${last.cpuThrottlePercentage}%`);
    const json = jsonReport(r) as { "cpu-throttle-percentage": number; rounds: { "cpu-throttle-percentage": number }[] };
    assert.deepEqual(json.rounds.map((x) => x["cpu-throttle-percentage"]), r.rounds.map((x) => x.cpuThrottlePercentage), "QEMU's name in --json");
    assert.equal(json["cpu-throttle-percentage"], steps.at(-1), "the throttle at the end of pre-copy");
    assert.match(htmlReport(r), /vCPU throttle in each round \(auto-converge\)/);
    assert.match(textReport(r), /throttle %/);
    const after = (await pair.src.client.getVm({ vm: "ac" })).vm!;
    assert.ok(after.vcpus.every((v) => v.cpuThrottlePercentage === 0), "the throttle stops with the migration");
  });

  test("a pass longer than 5 s gets QEMU's fallback syncs, each counted in dirty-sync-count and able to throttle", async () => {
    const c = pair.src.client;
    const vm = "ac-fallback";
    // 128 MiB over 100 Mbit/s: every pass of about 10 s.
    await c.createVm({ vm, vcpus: 2, seed: 3n, memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(128 * MiB) }] });
    await c.setWorkload({ vm, workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: 1e7 } });
    await c.advanceVm({ vm, durationNs: 1_000_000_000n });
    await c.setWorkload({ vm, workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, writesPerSecond: 5000 } });
    const r = await migrate(
      { sourceVm: vm, destinationVm: vm, bandwidthBitsPerSecond: 100e6, chunkPages: 4096, autoConverge: QEMU_AUTO_CONVERGE, completionTimeoutPerGiBS: 1e4 },
      { source: pair.src.client, destination: pair.dst.client },
    );
    assert.equal(r.status, "completed");
    assert.equal(r.verification?.match, true);
    assert.equal(r.rounds[0].fallbackSyncs, 0, "none in the first pass");
    assert.ok(r.rounds[1].durationMs > 5000 && r.rounds[1].fallbackSyncs >= 1, `round 1: ${r.rounds[1].durationMs} ms, ${r.rounds[1].fallbackSyncs} fallback syncs`);
    assert.equal(r.rounds[1].cpuThrottlePercentage, 20, "its trigger fired inside round 1's pass");
    const passes = r.rounds.filter((x) => x.round > 0 && !x.stopAndCopy).length;
    const fallback = r.rounds.reduce((n, x) => n + x.fallbackSyncs, 0);
    assert.equal(r.dirtySyncCount, passes + fallback + 2, "dirty-sync-count: each pass's sync, each fallback sync, the one that switched over, the final one");
  });

  test("a failed migration leaves the source running, not logging and not throttled", async () => {
    await hotVm("ac-fail");
    await assert.rejects(
      migrate({ ...cfg("ac-fail"), autoConverge: QEMU_AUTO_CONVERGE, completionTimeoutPerGiBS: 40 }, { source: pair.src.client, destination: pair.dst.client }),
      (e: MigrationError) => {
        assert.equal(e.kind, "not-converged");
        assert.ok(e.report!.rounds.some((x) => x.cpuThrottlePercentage > 0), "it was throttled before it failed");
        assert.deepEqual([e.report!.cleanup?.sourceRunning, e.report!.cleanup?.sourceLogging, e.report!.cleanup?.sourceThrottled], [true, false, false]);
        return true;
      },
    );
  });
});
