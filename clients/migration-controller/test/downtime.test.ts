/**
 * Downtime is QEMU's, from the source's stop to the destination's resume,
 * and the proof does not lengthen it: the destination resumes with a
 * snapshot of its memory, the digests compare the source at its stop with
 * the destination at its resume, and the destination's guest runs (and
 * writes) while they are computed.
 */
import assert from "node:assert/strict";
import { status } from "@grpc/grpc-js";
import { after, before, describe, test } from "node:test";
import { ClockDrive, WorkloadPattern } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { rejects } from "../../../tests/grpc-assert.js";
import { GiB, hypervisorPair, MiB } from "../../../tests/hypervisor-harness.js";
import { migrate, type ProgressEvent } from "../migrate.js";

describe("downtime and the proof", () => {
  // The real-time drive on, as the service runs it.
  const pair = hypervisorPair({ realtimeTickMs: 20 });
  before(() => pair.start());
  after(() => pair.stop());

  test("ResumeVm(snapshot) keeps memory as it was at the resume for one digest; writes after it do not change that digest", async () => {
    const c = pair.src.client;
    await c.createVm({ vm: "snap", vcpus: 1, startPaused: true, memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(4 * MiB) }], workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, writesPerSecond: 1e6 } });
    const before = await c.getMemoryDigest({ vm: "snap" });
    await rejects(c.getMemoryDigest({ vm: "snap", atResume: true }), status.FAILED_PRECONDITION, /no resume snapshot/);
    await c.resumeVm({ vm: "snap", snapshot: true });
    await c.advanceVm({ vm: "snap", durationNs: 10_000_000n });
    const live = await c.getMemoryDigest({ vm: "snap" });
    assert.notEqual(live.sha256Hex, before.sha256Hex, "the guest wrote after the resume");
    const atResume = await c.getMemoryDigest({ vm: "snap", atResume: true });
    assert.equal(atResume.sha256Hex, before.sha256Hex, "the snapshot is memory at the resume");
    await rejects(c.getMemoryDigest({ vm: "snap", atResume: true }), status.FAILED_PRECONDITION, /no resume snapshot/);
    await c.destroyVm({ vm: "snap" });
  });

  test("a real-time migration resumes the destination before it verifies, and verifies while the destination's guest writes", async () => {
    const vm = "rt-verify";
    await pair.src.client.createVm({
      vm,
      vcpus: 2,
      clock: ClockDrive.CLOCK_DRIVE_REALTIME,
      memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(64 * MiB) }],
      workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, writesPerSecond: 20_000 },
    });
    const seen: { phase: ProgressEvent["phase"]; destinationRunning: Promise<boolean> }[] = [];
    const r = await migrate(
      { sourceVm: vm, destinationVm: vm, bandwidthBitsPerSecond: 10e9, downtimeLimitMs: 300 },
      {
        source: pair.src.client,
        destination: pair.dst.client,
        onProgress: (e) => {
          if (e.phase === "verify") seen.push({ phase: e.phase, destinationRunning: pair.dst.client.getVm({ vm }).then((v) => v.vm!.vcpus.every((x) => !x.paused)) });
        },
      },
    );
    assert.equal(r.status, "completed");
    assert.equal(r.verification?.match, true);
    assert.equal(seen.length, 1);
    assert.equal(await seen[0].destinationRunning, true, "the destination runs while the proof is computed");
    assert.ok(r.downtimeMs !== null && r.downtimeMs > 0);
    // The destination's guest goes on writing: its memory now is no longer the source's at the stop.
    await new Promise((res) => setTimeout(res, 100));
    const [a, b] = await Promise.all([pair.src.client.getMemoryDigest({ vm }), pair.dst.client.getMemoryDigest({ vm })]);
    assert.equal(a.sha256Hex, r.verification!.sourceSha256, "the source stays as it stopped");
    assert.notEqual(b.sha256Hex, r.verification!.destinationSha256, "the destination ran on after its resume");
  });
});
