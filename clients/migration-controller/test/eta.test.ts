/** The estimated time to completion: the pre-copy geometric series, and how it compares with a migration's actual end. */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { WorkloadPattern } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { GiB, MiB, startHypervisor, type RunningHypervisor } from "../../../tests/hypervisor-harness.js";
import { estimatedCompletionMs } from "../eta.js";
import { migrate } from "../migrate.js";

test("the series: rounds shrink by q = dirty rate / bandwidth until what is left fits the threshold", () => {
  // 1000 B left, 100 B/s, 50 B/s dirtied, 100 B fit: 1000, 500, 250, 125 are sent, then 62.5 in stop-and-copy.
  assert.equal(estimatedCompletionMs(1000, 50, 100, 100), 19375);
  assert.equal(estimatedCompletionMs(80, 50, 100, 100), 800, "already within the threshold: stop-and-copy only");
  assert.equal(estimatedCompletionMs(1000, 100, 100, 100), null, "dirtying as fast as the link sends: never");
  assert.equal(estimatedCompletionMs(1000, 0, 100, 100), 10000, "an idle guest: one more pass");
});

let src: RunningHypervisor;
let dst: RunningHypervisor;
before(async () => {
  src = await startHypervisor();
  dst = await startHypervisor();
});
after(async () => {
  await src.close();
  await dst.close();
});

test("a migration's rounds carry the estimate made at their sync, close to the time that was actually left", async () => {
  const vm = "eta";
  await src.client.createVm({ vm, vcpus: 2, seed: 3n, memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(512 * MiB) }], workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: 1e8 } });
  await src.client.advanceVm({ vm, durationNs: 400_000_000n });
  await src.client.setWorkload({ vm, workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, writesPerSecond: 8000 } });
  const r = await migrate({ sourceVm: vm, destinationVm: vm, mechanism: "bitmap", bandwidthBitsPerSecond: 1e9, downtimeLimitMs: 50 }, { source: src.client, destination: dst.client });
  assert.equal(r.status, "completed");
  assert.equal(r.rounds[0].etaMs, null, "round 0: no rate yet");
  assert.equal(r.rounds.at(-1)!.etaMs, null, "stop-and-copy");
  const precopy = r.rounds.filter((x) => x.round > 0 && !x.stopAndCopy);
  assert.ok(precopy.length >= 2, `${precopy.length} pre-copy rounds after round 0`);
  // What was left after the first sync: the rest of the rounds, the final copy included.
  const first = precopy[0];
  const left = r.rounds.filter((x) => x.round >= first.round).reduce((n, x) => n + x.durationMs, 0);
  assert.ok(Math.abs(first.etaMs! - left) / left < 0.35, `estimated ${first.etaMs} ms at sync ${first.round}, ${left} ms were left`);
});
