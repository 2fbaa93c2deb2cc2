/**
 * Dirty-limit in a migration: a workload that plateaus without a policy
 * converges once QEMU's trigger sets the per-vCPU limit; each vCPU's
 * measured dirty rate then stays within 10% of it (QEMU's own tolerance is
 * 25 MB/s, so the limit here is 250); the limit goes with the migration; and
 * what cannot work is refused with the parameter named.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { Capability, WorkloadPattern } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { GiB, hypervisorPair, MiB } from "../../../tests/hypervisor-harness.js";
import { EXIT, runCli } from "../cli.js";
import { migrate, type MigrationError } from "../migrate.js";
import { QEMU_AUTO_CONVERGE } from "../policies/auto-converge.js";
import { QEMU_DIRTY_LIMIT } from "../policies/dirty-limit.js";
import { htmlReport, jsonReport, textReport } from "../report.js";

const LIMIT = 250; // MB/s per vCPU

describe("dirty-limit in a migration", () => {
  const pair = hypervisorPair();
  before(() => pair.start());
  after(() => pair.stop());

  /**
   * 512 MiB, all of it written once, then one vCPU dirtying about 350 MB/s
   * uniformly: over 2.5 Gbit/s (298 MiB/s) the remaining bytes level off at
   * about 160 MiB against a 89 MiB threshold.
   */
  const busyVm = async (vm: string, ring = true) => {
    const c = pair.src.client;
    await c.createVm({
      vm,
      vcpus: 1,
      seed: 3n,
      dirtyRing: ring ? { capability: Capability.CAPABILITY_DIRTY_LOG_RING_ACQ_REL, bytes: 4096n * 16n } : undefined,
      memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(512 * MiB) }],
      workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: 1e7 },
    });
    await c.advanceVm({ vm, durationNs: 2_000_000_000n });
    await c.setWorkload({ vm, workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, writesPerSecond: 128_000 } });
  };
  const cfg = (vm: string) => ({ sourceVm: vm, destinationVm: vm, mechanism: "ring", bandwidthBitsPerSecond: 2.5e9, downtimeLimitMs: 300 });
  const limit = { ...QEMU_DIRTY_LIMIT, vcpuDirtyLimitMBps: LIMIT };

  test("without it the remaining bytes level off; with it the vCPU is held within 10% of its limit, the guest slows, and it converges and verifies", async () => {
    await busyVm("no-dl");
    const plain = await migrate({ ...cfg("no-dl"), maxRounds: 20 }, { source: pair.src.client, destination: pair.dst.client });
    assert.equal(plain.switchover?.forced, true, "without dirty-limit only the 20-round cap ends it");

    await busyVm("dl");
    const r = await migrate({ ...cfg("dl"), dirtyLimit: limit }, { source: pair.src.client, destination: pair.dst.client });
    assert.equal(r.status, "completed");
    assert.equal(r.verification?.match, true);
    assert.equal(r.switchover?.forced, false, "it converged");
    assert.equal(r.dirtyLimitMBps, LIMIT);
    assert.ok(r.rounds.length < plain.rounds.length);
    const sleep = r.rounds.map((x) => x.dirtyLimitThrottleTimePerRoundUs);
    // Rounds whose vCPU rate was measured under a sleep that no longer changed.
    const settled = r.rounds.filter((x, i) => i > 0 && !x.stopAndCopy && sleep[i] > 0 && sleep[i] === sleep[i - 1]);
    assert.ok(settled.length >= 1, `sleep per full ring by round: ${sleep}`);
    for (const x of settled) {
      const mbps = (x.vcpuDirtyRatesPagesPerSecond![0] * 4096) / 2 ** 20;
      assert.ok(Math.abs(mbps - LIMIT) <= LIMIT * 0.1, `round ${x.round}: the vCPU dirtied ${mbps.toFixed(0)} MB/s against a limit of ${LIMIT}`);
    }
    const unlimited = (r.rounds[1].vcpuDirtyRatesPagesPerSecond![0] * 4096) / 2 ** 20;
    assert.ok(unlimited > LIMIT * 1.3, `before the limit the vCPU dirtied ${unlimited.toFixed(0)} MB/s`);
    const lastPrecopy = r.rounds.filter((x) => !x.stopAndCopy).at(-1)!;
    assert.ok(lastPrecopy.guestWritesPerSecond < r.rounds[1].guestWritesPerSecond * 0.9, "the guest's writes fall under the limit");

    const json = jsonReport(r) as Record<string, unknown> & { rounds: Record<string, unknown>[] };
    assert.equal(json["vcpu-dirty-limit"], LIMIT);
    assert.equal(json["dirty-limit-throttle-time-per-round"], r.dirtyLimitThrottleTimePerRoundUs);
    assert.ok((json["dirty-limit-ring-full-time"] as number) > 0);
    assert.deepEqual(json.rounds.map((x) => x["dirty-limit-throttle-time-per-round"]), sleep, "QEMU's name in --json");
    assert.ok(Array.isArray(json.rounds[1]["vcpu-dirty-rate"]));
    assert.match(textReport(r), /limit sleep µs\/full/);
    assert.match(htmlReport(r), /Sleep per full ring at each sync \(dirty-limit, 250 MB\/s per vCPU\)/);
    const after = (await pair.src.client.getVm({ vm: "dl" })).vm!;
    assert.ok(after.vcpus.every((v) => v.dirtyLimitMbps === 0n), "the limit goes with the migration");
  });

  test("a failed migration leaves the source running, not logging and not limited", async () => {
    await busyVm("dl-fail");
    await assert.rejects(
      migrate({ ...cfg("dl-fail"), dirtyLimit: limit, completionTimeoutPerGiBS: 8 }, { source: pair.src.client, destination: pair.dst.client }),
      (e: MigrationError) => {
        assert.equal(e.kind, "not-converged");
        assert.ok(e.report!.dirtyLimitMBps > 0, "it was limited before it failed");
        assert.deepEqual([e.report!.cleanup?.sourceRunning, e.report!.cleanup?.sourceLogging, e.report!.cleanup?.sourceThrottled], [true, false, false]);
        return true;
      },
    );
  });

  test("refused with the parameter named: no dirty ring, a bitmap mechanism, with auto-converge, a limit below 1 MB/s, a period over 1000 ms", async () => {
    await busyVm("dl-noring", false);
    const usage = (re: RegExp) => (e: MigrationError) => {
      assert.equal(e.kind, "usage");
      assert.match(e.message, re);
      return true;
    };
    const ep = { source: pair.src.client, destination: pair.dst.client };
    await assert.rejects(migrate({ ...cfg("dl-noring"), dirtyLimit: limit }, ep), usage(/dirty-limit requires KVM with accelerator property 'dirty-ring-size' set: source VM 'dl-noring' has no dirty ring/));
    await assert.rejects(migrate({ ...cfg("dl-noring"), mechanism: "bitmap", dirtyLimit: limit }, ep), usage(/dirty-limit works through the dirty ring; mechanism bitmap/));
    await assert.rejects(migrate({ ...cfg("dl-noring"), dirtyLimit: limit, autoConverge: QEMU_AUTO_CONVERGE }, ep), usage(/dirty-limit conflicts with auto-converge/));
    await assert.rejects(migrate({ ...cfg("dl-noring"), dirtyLimit: { ...limit, vcpuDirtyLimitMBps: 0 } }, ep), usage(/vcpu-dirty-limit must be a whole number of MB\/s >= 1 \(got 0\)/));
    await assert.rejects(migrate({ ...cfg("dl-noring"), dirtyLimit: { ...limit, periodMs: 1001 } }, ep), usage(/x-vcpu-dirty-limit-period must be a whole number of ms in \[1, 1000\] \(got 1001\)/));
    assert.equal((await pair.dst.client.listVms({})).vms.some((v) => v.vm === "dl-noring"), false, "nothing was created");
  });

  test("the CLI: --dirty-limit's parameters need it, and it excludes --auto-converge", async () => {
    const run = async (...args: string[]) => {
      let err = "";
      const code = await runCli(["migrate", "--vm", "x", ...args], { out: { write: () => true }, err: { write: (s: string) => (err += s) }, env: {} });
      return { code, err };
    };
    let r = await run("--vcpu-dirty-limit", "5");
    assert.equal(r.code, EXIT.usage);
    assert.match(r.err, /--vcpu-dirty-limit needs --dirty-limit/);
    r = await run("--dirty-limit", "--auto-converge");
    assert.equal(r.code, EXIT.usage);
    assert.match(r.err, /--dirty-limit conflicts with --auto-converge/);
    r = await run("--dirty-limit", "--vcpu-dirty-limit-period", "0");
    assert.equal(r.code, EXIT.usage);
    assert.match(r.err, /--vcpu-dirty-limit-period 0: must be a whole number of ms from 1ms to 1s/);
    r = await run("--throttle-trigger-threshold", "40");
    assert.equal(r.code, EXIT.usage);
    assert.match(r.err, /--throttle-trigger-threshold needs --auto-converge or --dirty-limit/);
  });
});
