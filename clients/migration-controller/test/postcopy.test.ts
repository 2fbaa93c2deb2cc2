/**
 * Post-copy in a migration: a workload that pre-copy cannot carry over the
 * link completes once the guest moves to the destination and its pages
 * follow, is proven bit for bit, and reports QEMU's post-copy figures;
 * postcopy-preempt answers page requests sooner; a source that dies after
 * the switch loses the VM, reported as such, with the destination kept.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { ClockDrive, WorkloadPattern } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { connectHypervisor, type HypervisorClient } from "../../../services/hypervisor/client.js";
import { GiB, hypervisorPair, MiB, startHypervisor } from "../../../tests/hypervisor-harness.js";
import { EXIT, runCli } from "../cli.js";
import { migrate, type MigrationError } from "../migrate.js";
import { spans } from "../phases/postcopy.js";
import { htmlReport, jsonReport, textReport } from "../report.js";

/** 64 MiB, all of it written once, then 2 vCPUs writing and reading it uniformly: over 1 Gbit/s with a 1 ms latency pre-copy levels off far above the threshold. */
async function busyVm(c: HypervisorClient, vm: string, clock = ClockDrive.CLOCK_DRIVE_STEPPED) {
  await c.createVm({ vm, vcpus: 2, seed: 5n, clock, memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(64 * MiB) }] });
  if (clock === ClockDrive.CLOCK_DRIVE_STEPPED) {
    await c.setWorkload({ vm, workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: 1e7 } });
    await c.advanceVm({ vm, durationNs: 1_000_000_000n });
  }
  await c.setWorkload({ vm, workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, writesPerSecond: 20_000, readsPerSecond: 20_000 } });
}
const cfg = (vm: string) => ({ sourceVm: vm, destinationVm: vm, bandwidthBitsPerSecond: 1e9, latencyNs: 1_000_000, downtimeLimitMs: 30, completionTimeoutPerGiBS: 200 });

describe("post-copy in a migration", () => {
  const pair = hypervisorPair();
  before(() => pair.start());
  after(() => pair.stop());

  test("pre-copy alone does not converge; with post-copy it completes and verifies, with the downtime of the switch, requests and blocktime reported; preempt waits less", async () => {
    await busyVm(pair.src.client, "pre-only");
    await assert.rejects(migrate(cfg("pre-only"), { source: pair.src.client, destination: pair.dst.client }), (e: MigrationError) => e.kind === "not-converged");

    const results = [];
    for (const preempt of [false, true]) {
      const vm = `pc-${preempt}`;
      await busyVm(pair.src.client, vm);
      const r = await migrate({ ...cfg(vm), postcopy: { afterRounds: null, preempt } }, { source: pair.src.client, destination: pair.dst.client });
      assert.equal(r.status, "completed");
      assert.equal(r.verification?.match, true, "every page the destination did not write since the switch is the source's at the switch");
      assert.equal(r.switchover?.postcopy, true);
      const pc = r.postcopy!;
      assert.ok(pc.missingPages > 1000, `${pc.missingPages} pages missing at the switch`);
      assert.equal(pc.requestedPages + pc.pushedPages, pc.missingPages, "every missing page is sent once");
      assert.equal(pc.bytes, pc.missingPages * 4104);
      assert.ok(pc.requests > 0 && pc.blocktimeMs > 0 && pc.vcpuBlocktimeMs.length === 2);
      assert.ok(pc.vcpuBlocktimeMs.every((b) => b >= pc.blocktimeMs - 1e-6), "all vCPUs waiting at once is within each one's wait");
      assert.ok(r.downtimeMs! < 5, `downtime ${r.downtimeMs} ms: the switch, not the copy`);
      assert.ok(r.rounds.at(-1)!.postcopy);
      const after = (await pair.dst.client.getVm({ vm })).vm!;
      assert.ok(after.vcpus.every((v) => !v.paused) && after.postcopy?.active === false, "the destination runs, post-copy over");
      const json = jsonReport(r) as { ram: Record<string, number> } & Record<string, unknown>;
      assert.equal(json.ram["postcopy-requests"], pc.requests);
      assert.equal(json.ram["postcopy-bytes"], pc.bytes);
      assert.equal(json["postcopy-blocktime"], Math.round(pc.blocktimeMs), "QEMU's uint32 ms");
      assert.deepEqual(json["postcopy-vcpu-blocktime"], pc.vcpuBlocktimeMs.map(Math.round));
      assert.match(textReport(r), /post-copy: [\d,]+ pages missing at the switch/);
      assert.match(htmlReport(r), /Post-copy/);
      results.push(pc);
    }
    const [plain, preempt] = results;
    assert.ok(preempt.blocktimeMs < plain.blocktimeMs, `blocktime ${plain.blocktimeMs.toFixed(1)} ms -> ${preempt.blocktimeMs.toFixed(1)} ms with preempt`);
    assert.ok(preempt.requestedPages > plain.requestedPages, "with preempt more requested pages arrive before the push gets to them");
  });

  test("a post-copy that outlasts the deadline of ordinary calls completes: the page-request stream lives as long as the phase", async () => {
    // Under load a post-copy took longer than the 10 s deadline of ordinary calls, the request stream hit it, and the VM was lost.
    await busyVm(pair.src.client, "long-pc");
    let switchedAt = 0;
    const onProgress = (e: { phase: string }) => {
      if (e.phase === "postcopy" && !switchedAt) switchedAt = Date.now();
    };
    // The CLI's clients: --rpc-timeout is the deadline of every call that names none.
    const rpcTimeoutMs = 250;
    const [source, destination] = [pair.src, pair.dst].map((h) => connectHypervisor(h.address, { deadlineMs: rpcTimeoutMs, hangTimeoutMs: 10_000 }));
    try {
      const r = await migrate({ ...cfg("long-pc"), bandwidthBitsPerSecond: 2e8, rpcTimeoutMs, postcopy: { afterRounds: 1, preempt: true } }, { source, destination, onProgress });
      const postcopyWallMs = Date.now() - switchedAt;
      assert.equal(r.status, "completed");
      assert.equal(r.verification?.match, true);
      assert.ok(switchedAt > 0 && postcopyWallMs > rpcTimeoutMs, `post-copy took ${postcopyWallMs} ms of wall time, more than the ${rpcTimeoutMs} ms deadline`);
    } finally {
      source.close();
      destination.close();
    }
  });

  test("after N rounds when asked, in the real-time drive too", async () => {
    const rt = hypervisorPair({ realtimeTickMs: 20 });
    await rt.start();
    try {
      await rt.src.client.createVm({
        vm: "rt",
        vcpus: 1,
        clock: ClockDrive.CLOCK_DRIVE_REALTIME,
        memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(16 * MiB) }],
        workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, writesPerSecond: 200_000, readsPerSecond: 20_000 },
      });
      // Its memory written once before the migration, as a running guest's would be.
      await new Promise((res) => setTimeout(res, 300));
      const r = await migrate({ sourceVm: "rt", destinationVm: "rt", bandwidthBitsPerSecond: 1e9, downtimeLimitMs: 1, postcopy: { afterRounds: 2, preempt: true } }, { source: rt.src.client, destination: rt.dst.client });
      assert.equal(r.drive, "realtime");
      assert.deepEqual([r.switchover?.postcopy, r.switchover?.round], [true, 2]);
      assert.equal(r.status, "completed");
      assert.equal(r.verification?.match, true);
      assert.ok(r.postcopy!.missingPages > 0);
    } finally {
      await rt.stop();
    }
  });

  test("a source that dies after the switch loses the VM: postcopy-lost, exit 6, the destination kept, its vCPUs waiting on the missing pages", async () => {
    const src = await startHypervisor();
    let closed: Promise<void> | null = null;
    try {
      await busyVm(src.client, "doomed");
      await assert.rejects(
        migrate(
          { ...cfg("doomed"), rpcTimeoutMs: 1000, postcopy: { afterRounds: 1, preempt: true } },
          {
            source: src.client,
            destination: pair.dst.client,
            onProgress: (e) => {
              if (e.phase === "postcopy") closed ??= src.close();
            },
          },
        ),
        (e: MigrationError) => {
          assert.equal(e.kind, "postcopy-lost");
          assert.equal(EXIT[e.kind], 6);
          assert.match(e.message, /post-copy failed after the switch, and the VM is lost/);
          assert.equal(e.report!.cleanup?.destinationRemoved, null, "the destination was not removed");
          return true;
        },
      );
      const d = (await pair.dst.client.getVm({ vm: "doomed" })).vm!;
      assert.ok(d.vcpus.every((v) => !v.paused), "the destination is kept and not paused by the controller");
      assert.equal(d.postcopy?.active, true, "with pages still missing");
      const step = await pair.dst.client.advanceVm({ vm: "doomed", durationNs: 10_000_000n });
      assert.ok(step.vcpus.every((v) => v.writes === 0n), "its vCPUs wait on pages that never come (QEMU's postcopy-paused)");
    } finally {
      await (closed ?? src.close());
    }
  });

  test("requested pages far apart in one slot are read in spans a ReadMemory chunk can reach", () => {
    const max = 1 << 20;
    assert.deepEqual(spans([0, 5, max - 1, max, 3 * max], max), [[0, 5, max - 1], [max], [3 * max]]);
    assert.deepEqual(spans([], max), []);
  });

  test("the CLI: --postcopy's parameters need it", async () => {
    let err = "";
    const code = await runCli(["migrate", "--vm", "x", "--postcopy-preempt"], { out: { write: () => true }, err: { write: (s: string) => (err += s) }, env: {} });
    assert.equal(code, EXIT.usage);
    assert.match(err, /--postcopy-preempt needs --postcopy/);
  });
});
