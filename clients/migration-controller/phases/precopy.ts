/**
 * Pre-copy (QEMU's migration_iteration_run): round 0 sends every page while
 * the guest runs; then each sync of the dirty state (dirty-sync-count is the
 * round counter) is shown to the policies, which act on the guest or end
 * pre-copy, and otherwise what the sync found is sent in the next round.
 */
import { MigrationError } from "../errors.js";
import { PAGE_SIZE } from "../link.js";
import type { Decision, SyncState } from "../policies/policy.js";
import type { MigrationRun } from "../run.js";
import type { SyncResult } from "../trackers/tracker.js";
import { FallbackSyncTimer } from "../fallback-sync.js";
import { estimatedCompletionMs } from "../eta.js";
import { popcount, sendPages, type MidPassSync } from "../transfer.js";

/** How pre-copy ended: the last sync (its pages not sent yet), and why. */
export interface PrecopyEnd {
  sync: SyncResult;
  remainingBytes: number;
  dirtyRatePagesPerSecond: number;
  verdict: Extract<Decision, { kind: "switchover" | "postcopy" }>;
}

/** Applies a decision that acts on the guest. */
async function actOnGuest(run: MigrationRun, d: Decision): Promise<void> {
  const vm = run.cfg.sourceVm;
  if (d.kind === "throttle") {
    run.did.throttled = true;
    await run.on("source", () => run.source.setCpuThrottle({ vm, percentage: d.percentage }));
    run.report.cpuThrottlePercentage = d.percentage;
  } else if (d.kind === "dirty-limit") {
    run.did.dirtyLimited = true;
    const periodMs = run.cfg.dirtyLimit!.periodMs;
    await run.on("source", () => run.source.setVcpuDirtyLimit({ vm, dirtyRateMbps: BigInt(d.mbPerSecond), periodMs }));
    run.tracker.limitDirtyRate?.(periodMs * 1e6);
    run.report.dirtyLimitMBps = d.mbPerSecond;
  }
}

/** query-migrate's dirty-limit figures, while a limit is in service. */
async function lookAtDirtyLimit(run: MigrationRun): Promise<void> {
  if (!run.did.dirtyLimited) return;
  const q = await run.on("source", () => run.source.queryVcpuDirtyLimit({ vm: run.cfg.sourceVm }));
  run.report.dirtyLimitThrottleTimePerRoundUs = Number(q.throttleTimePerRoundUs);
  run.report.dirtyLimitRingFullTimeUs = Number(q.ringFullTimeUs);
}

export async function precopy(run: MigrationRun): Promise<PrecopyEnd> {
  const { report, tracker, clock } = run;
  const totalPages = run.src.memslots.reduce((n, s) => n + Number(s.numPages), 0);
  run.policies.active = true;
  run.progress("round", { dirtyPages: totalPages, remainingBytes: totalPages * PAGE_SIZE });
  await run.beginRounds();
  let lastSyncAt = clock.now();
  let vcpuPagesAt: number[] | null = null;

  /**
   * A sync of the dirty state: its host time passes, and the rates since the
   * previous one are what the policies see; remainingOf: the pages left to
   * send after it (with what a fallback sync carried over).
   */
  const syncNow = async (remainingOf: (s: SyncResult) => number = (s) => s.dirtyPages) => {
    const sync = await run.on("source", () => tracker.sync(false));
    report.dirtySyncCount++;
    // The guest ran through what the sync let it (vcpus_run); the rest of its host time passes now.
    clock.passed(sync.guestRanNs ?? 0);
    await run.elapse(sync.hostNs - (sync.guestRanNs ?? 0));
    const now = clock.now();
    const perS = (pages: number) => (now > lastSyncAt ? (pages * 1e9) / (now - lastSyncAt) : 0);
    const rate = perS(sync.dirtyPages);
    const vcpuRates = sync.vcpuDirtyPages ? sync.vcpuDirtyPages.map((n, i) => perS(n - (vcpuPagesAt?.[i] ?? 0))) : null;
    vcpuPagesAt = sync.vcpuDirtyPages ?? null;
    lastSyncAt = now;
    report.dirtyRatePagesPerSecond = rate;
    const state: SyncState = {
      round: report.dirtySyncCount,
      nowNs: now,
      dirtyPages: sync.dirtyPages,
      remainingBytes: remainingOf(sync) * PAGE_SIZE,
      thresholdBytes: run.thresholdBytes,
      dirtyRatePagesPerSecond: rate,
      vcpuDirtyRatesPagesPerSecond: vcpuRates,
      transferredBytes: report.transferredBytes,
    };
    return { sync, state };
  };

  // With auto-converge, QEMU's 5 s timer syncs in the middle of a long pass (fallback-sync.ts).
  const timer = run.cfg.autoConverge ? new FallbackSyncTimer(clock.now()) : null;
  let fallbackSyncs = 0;
  const midPass: MidPassSync | undefined = timer
    ? {
        carry: new Map(),
        due: async () => {
          if (!timer.tick(clock.now(), report.dirtySyncCount)) return null;
          const { sync, state } = await syncNow();
          fallbackSyncs++;
          for (const a of run.policies.decideMidPass(state)) await actOnGuest(run, a);
          return sync.bitmaps;
        },
      }
    : undefined;

  /**
   * A round's pass; if the migration fails during it, the report keeps the
   * round as far as it got (the figures of the sync that opened it, what it
   * sent), marked as the one that ended the migration.
   */
  type Opened = Parameters<MigrationRun["endRound"]>[0];
  const pass = async (opened: Opened, select: Map<number, Uint8Array> | null, remainingBytes: number) => {
    const at = { normal: report.normalPages, zero: report.zeroPages, bytes: report.transferredBytes };
    try {
      return await sendPages(run, select, remainingBytes, select ? midPass : undefined);
    } catch (err) {
      const partial = { normal: report.normalPages - at.normal, zero: report.zeroPages - at.zero, bytes: report.transferredBytes - at.bytes };
      report.precopyBytes += partial.bytes;
      await run.endRound({ ...opened, endedMigration: true }, partial).catch(() => undefined);
      throw err;
    }
  };

  const opened0: Opened = { round: 0, dirtyPages: totalPages, syncHostMs: 0, dirtyRatePagesPerSecond: 0, vcpuDirtyRatesPagesPerSecond: null, remainingBytes: totalPages * PAGE_SIZE, stopAndCopy: false };
  let sent = await pass(opened0, null, totalPages * PAGE_SIZE);
  report.precopyBytes += sent.bytes;
  await run.endRound(opened0, sent);

  for (;;) {
    // What a fallback sync found where the pass had already been goes with this round.
    const { sync, state } = await syncNow((s) => (midPass && midPass.carry.size ? takeCarry(s, midPass.carry) : s.dirtyPages));
    const remaining = state.remainingBytes;
    const rate = state.dirtyRatePagesPerSecond;
    const vcpuRates = state.vcpuDirtyRatesPagesPerSecond;
    const { actions, verdict } = run.policies.decide(state);
    for (const a of actions) await actOnGuest(run, a);
    await lookAtDirtyLimit(run);
    report.expectedDowntimeMs = remaining / run.bwBytesPerMs;
    const etaMs = estimatedCompletionMs(remaining, rate * PAGE_SIZE, run.link.bytesPerSecond, run.thresholdBytes);
    run.progress("round", { dirtyPages: sync.dirtyPages, remainingBytes: remaining, dirtyRatePagesPerSecond: rate, expectedDowntimeMs: report.expectedDowntimeMs, etaMs });
    if (verdict.kind === "fail") {
      // The report keeps the sync that ended it: what it found, with nothing sent after it.
      await run.endRound({ round: report.dirtySyncCount, dirtyPages: sync.dirtyPages, syncHostMs: sync.hostNs / 1e6, dirtyRatePagesPerSecond: rate, vcpuDirtyRatesPagesPerSecond: vcpuRates, remainingBytes: remaining, stopAndCopy: false, etaMs, endedMigration: true }, { normal: 0, zero: 0, bytes: 0 }).catch(() => undefined);
      throw new MigrationError(verdict.failure, verdict.message);
    }
    if (verdict.kind === "switchover" || verdict.kind === "postcopy") {
      run.policies.active = false;
      return { sync, remainingBytes: remaining, dirtyRatePagesPerSecond: rate, verdict };
    }
    const round = report.dirtySyncCount;
    fallbackSyncs = 0;
    const opened: Opened = { round, dirtyPages: remaining / PAGE_SIZE, syncHostMs: sync.hostNs / 1e6, dirtyRatePagesPerSecond: rate, vcpuDirtyRatesPagesPerSecond: vcpuRates, remainingBytes: remaining, stopAndCopy: false, etaMs };
    sent = await pass(opened, sync.bitmaps, remaining);
    report.precopyBytes += sent.bytes;
    await run.endRound({ ...opened, fallbackSyncs }, sent);
  }
}

/** ORs the carried pages into a sync's bitmaps, empties carry, and returns the pages now dirty. */
function takeCarry(sync: SyncResult, carry: Map<number, Uint8Array>): number {
  for (const [slot, c] of carry) {
    const bm = sync.bitmaps.get(slot);
    if (bm) for (let i = 0; i < c.length; i++) bm[i] |= c[i];
  }
  carry.clear();
  let n = 0;
  for (const bm of sync.bitmaps.values()) n += popcount(bm, bm.length * 8);
  return n;
}
