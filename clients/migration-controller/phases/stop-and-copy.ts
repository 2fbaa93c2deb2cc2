/**
 * Stop and copy (QEMU's migration_completion): the source is paused, a last
 * sync collects what was dirtied since the previous one, everything still
 * dirty is sent, the vCPUs' state follows, and the destination resumes.
 * Downtime is QEMU's: from the source's stop to the destination's resume.
 * The destination keeps a snapshot of its memory at the resume, so that
 * the proof (verify.ts) runs after the downtime, not inside it.
 */
import type { MigrationRun } from "../run.js";
import { orBitmaps, popcount, sendPages } from "../transfer.js";
import type { PrecopyEnd } from "./precopy.js";

export async function stopAndCopy(run: MigrationRun, end: PrecopyEnd): Promise<void> {
  const { report, tracker, clock, cfg, source, destination } = run;
  const { sync, remainingBytes } = end;
  const forced = end.verdict.kind === "switchover" && end.verdict.forced;
  report.switchover = { round: report.dirtySyncCount, remainingBytes, thresholdBytes: run.thresholdBytes, forced, postcopy: false };
  run.progress("switchover", { dirtyPages: sync.dirtyPages, remainingBytes });
  const pauseAt = clock.now();
  run.did.paused = true;
  await run.on("source", () => source.pauseVm({ vm: cfg.sourceVm }));
  const last = await run.on("source", () => tracker.sync(true));
  report.dirtySyncCount++;
  await run.elapse(last.hostNs);
  const before = report.transferredBytes;
  const union = orBitmaps(sync.bitmaps, last.bitmaps);
  const sent = await sendPages(run, union, remainingBytes);
  report.downtimeBytes = report.transferredBytes - before;
  const unionPages = [...union.values()].reduce((n, b) => n + popcount(b, b.length * 8), 0);
  await run.endRound(
    { round: report.dirtySyncCount, dirtyPages: unionPages, syncHostMs: (sync.hostNs + last.hostNs) / 1e6, dirtyRatePagesPerSecond: end.dirtyRatePagesPerSecond, vcpuDirtyRatesPagesPerSecond: null, remainingBytes, stopAndCopy: true },
    sent,
  );
  // The vCPUs' state goes with the memory: the destination's guest goes on where the source's stopped.
  const state = await run.on("source", () => source.getVcpuState({ vm: cfg.sourceVm }));
  await run.on("destination", () => destination.setVcpuState({ vm: cfg.destinationVm, vcpus: state.vcpus, writeSequence: state.writeSequence }));
  await run.on("destination", () => destination.resumeVm({ vm: cfg.destinationVm, snapshot: true }));
  report.downtimeMs = (clock.now() - pauseAt) / 1e6;
}
