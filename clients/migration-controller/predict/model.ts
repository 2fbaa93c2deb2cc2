/**
 * A migration's outcome predicted before running it: pre-copy round by
 * round in closed form, with the controller's own policy chain deciding at
 * every predicted sync (the threshold, KubeVirt's timeouts, auto-converge's
 * throttle steps, dirty-limit, post-copy), and the mechanism's costs from
 * the cost model. The parts:
 * - Round 0 sends every page; each later round sends what the sync before it
 *   found. A round of P pages lasts P x 4104 bytes / bandwidth (QEMU's page
 *   header included) plus the sync's host time, during which the guest runs.
 * - In t seconds a guest dirties W (1 - e^(-r t / W)) distinct pages of a
 *   working set of W pages at an initial rate of r pages/s (independent
 *   writes over the set; a hot set rewritten saturates).
 * - Tracking slows it: every page it dirties first costs the vCPU the
 *   mechanism's per-page price (a write fault; the hardware's dirty update
 *   with DBM or PML; a ring-full exit and a wait every ring of pages), so a
 *   vCPU dirtying r_v pages/s untracked dirties r_v / (1 + r_v c) tracked.
 *   A CPU throttle of p% leaves (1 - p/100) of it; a dirty limit caps it.
 * - A sync costs what the hypervisor charges: the ioctl, the bitmap words,
 *   each dirty page re-protected (GET; CLEAR per chunk with manual protect),
 *   the descriptor scan of DBM, the ring entries harvested and reset.
 * Not modelled: auto-converge's 5 s mid-pass syncs, the mmu_lock contention
 * of vCPUs faulting at once, zero pages (every page is sent whole).
 */
import { NORMAL_PAGE_BYTES, PAGE_SIZE } from "../link.js";
import { policiesFor } from "../policies/index.js";
import type { SyncState } from "../policies/policy.js";
import type { MechanismSpec } from "../trackers/mechanism.js";
import type { MigrationConfig } from "../types.js";
import { validate } from "../migrate.js";
import type { CostModel } from "../../../services/hypervisor/model/cost-model.js";

export interface PredictInput {
  memoryBytes: number;
  /** Pages the guest writes to; memoryBytes when it writes everywhere. */
  workingSetBytes: number;
  /** Distinct pages dirtied per second, untracked, over the whole VM (the initial rate, before the working set saturates). */
  dirtyPagesPerSecond: number;
  vcpus: number;
  mechanism: MechanismSpec;
  /** Dirty-ring entries per vCPU (rings only). */
  ringEntries: number;
  config: Omit<MigrationConfig, "sourceVm" | "destinationVm">;
  costs: CostModel;
}

export interface PredictedRound {
  round: number;
  /** Guest time at the start of the round's pass. */
  startMs: number;
  pages: number;
  durationMs: number;
  syncHostMs: number;
  cpuThrottlePercentage: number;
}

export interface Prediction {
  converges: boolean;
  /** How it ends: switchover, post-copy, or the policy's failure. */
  outcome: "switchover" | "postcopy" | "not-converged";
  reason: string;
  rounds: PredictedRound[];
  dirtySyncCount: number;
  totalTimeMs: number;
  downtimeMs: number | null;
  transferredBytes: number;
  /** The guest's slowdown from the per-page price at the untracked rate, 0 to 1 (throttling not included). */
  trackingSlowdown: number;
  /** The per-page price the mechanism charges the vCPU, ns. */
  pagePriceNs: number;
}

/** The ring tracker reaps full rings after each guest step of at most this long (trackers/ring.ts): a full ring waits half of it on average. */
const RING_REAP_STEP_NS = 5_000_000;
/** A bound on predicted rounds (a migration that never converges and never times out). */
const MAX_ROUNDS = 100_000;

/** What dirtying a page for the first time costs the vCPU, ns. */
export function pagePriceNs(m: MechanismSpec, c: CostModel, ringEntries: number): number {
  const hw = m.assist === "dbm" || m.assist === "pml";
  let ns = hw ? c.dbmUpdateNs + (m.assist === "pml" ? c.pmlLogNs + c.pmlFullExitNs / 512 : 0) : c.writeFaultNs;
  if (m.log === "ring") ns += (c.userspaceExitNs + RING_REAP_STEP_NS / 2) / ringEntries;
  return ns;
}

/** Host time of the sync that finds `dirty` of `pages` pages dirty, and of the CLEARs of the pass that sends them, ns. */
export function syncHostNs(m: MechanismSpec, c: CostModel, pages: number, dirty: number): { sync: number; pass: number } {
  const words = Math.ceil(pages / 64);
  if (m.log === "ring") return { sync: c.ioctlNs + dirty * (c.ringHarvestEntryNs + c.ringResetEntryNs), pass: 0 };
  let sync = c.ioctlNs + words * (c.bitmapWordScanNs + c.bitmapWordCopyNs);
  if (m.assist === "dbm") sync += pages * c.dbmScanPteNs;
  if (m.assist === "hdbss") sync += dirty * c.hdbssFlushEntryNs;
  if (m.assist === "pml") sync += dirty * c.pmlDrainEntryNs;
  if (m.assist === "device") sync += Math.ceil(dirty / 512) * c.deviceReadCallNs + dirty * c.deviceReadGpaNs;
  const protect = dirty * (m.protection === "get" ? c.getPageWriteProtectNs : c.clearPageWriteProtectNs);
  return m.protection === "get" ? { sync: sync + protect, pass: 0 } : { sync, pass: protect + c.tlbFlushNs };
}

/** Throws MigrationError("usage") for a configuration the controller would refuse (dirty-limit without rings, …). */
export function predict(p: PredictInput): Prediction {
  const cfg = { ...p.config, mechanism: p.mechanism.name, sourceVm: "predicted", destinationVm: "predicted" };
  validate(cfg);
  const N = p.memoryBytes / PAGE_SIZE;
  const W = Math.max(1, Math.min(N, p.workingSetBytes / PAGE_SIZE));
  const B = cfg.bandwidthBitsPerSecond / 8;
  const thresholdBytes = B * (cfg.downtimeLimitMs / 1e3);
  const chain = policiesFor(cfg, { memoryBytes: p.memoryBytes, thresholdBytes, linkBytesPerSecond: B, startNs: 0 });
  chain.active = true;
  const price = pagePriceNs(p.mechanism, p.costs, p.ringEntries);
  const perVcpu = p.dirtyPagesPerSecond / p.vcpus;
  const tracked = perVcpu / (1 + (perVcpu * price) / 1e9);
  let throttle = 0;
  let limitPagesPerSecond = Infinity;
  const rate = () => p.vcpus * Math.min(tracked * (1 - throttle / 100), limitPagesPerSecond);
  const dirtied = (ns: number) => W * (1 - Math.exp((-rate() * ns) / 1e9 / W));
  const enableNs = p.mechanism.protection === "initially-set" ? p.costs.enableLoggingInitiallySetNs : N * p.costs.enableLoggingPageNs;

  const rounds: PredictedRound[] = [];
  let t = enableNs;
  let pages = N;
  let transferred = 0;
  let lastSync = t;
  const end = (outcome: Prediction["outcome"], reason: string, downtimeMs: number | null, totalNs: number): Prediction => ({
    converges: outcome !== "not-converged",
    outcome,
    reason,
    rounds,
    // The syncs of pre-copy, and stop-and-copy's (or post-copy's) last one.
    dirtySyncCount: rounds.length + (outcome === "not-converged" ? 0 : 1),
    totalTimeMs: totalNs / 1e6,
    downtimeMs,
    transferredBytes: transferred,
    trackingSlowdown: 1 - tracked / Math.max(perVcpu, 1e-12),
    pagePriceNs: price,
  });
  for (let round = 0; round < MAX_ROUNDS; round++) {
    const start = t;
    const sendNs = ((pages * NORMAL_PAGE_BYTES) / B) * 1e9 + (round > 0 ? syncHostNs(p.mechanism, p.costs, N, pages).pass : 0);
    // A deadline inside the pass ends the migration there, as the controller's watch does between chunks.
    const deadline = chain.nextDeadlineNs();
    if (start + sendNs >= deadline) {
      const d = chain.check(deadline);
      if (d.kind === "fail") return end("not-converged", d.message, null, deadline);
    }
    t += sendNs;
    transferred += pages * NORMAL_PAGE_BYTES;
    chain.onSent(0, t);
    const found = dirtied(t - lastSync);
    const syncNs = syncHostNs(p.mechanism, p.costs, N, found).sync;
    // The guest runs through the sync (vcpus_run): what it dirties meanwhile counts in the next one.
    t += syncNs;
    rounds.push({ round, startMs: start / 1e6, pages, durationMs: (t - start) / 1e6, syncHostMs: syncNs / 1e6, cpuThrottlePercentage: throttle });
    const dirty = Math.round(found);
    const state: SyncState = {
      round: round + 1,
      nowNs: t,
      dirtyPages: dirty,
      remainingBytes: dirty * PAGE_SIZE,
      thresholdBytes,
      dirtyRatePagesPerSecond: (dirty * 1e9) / (t - lastSync),
      vcpuDirtyRatesPagesPerSecond: p.mechanism.log === "ring" ? Array.from({ length: p.vcpus }, () => (dirty * 1e9) / (t - lastSync) / p.vcpus) : null,
      transferredBytes: transferred,
    };
    lastSync = t - syncNs;
    const { actions, verdict } = chain.decide(state);
    for (const a of actions) {
      if (a.kind === "throttle") throttle = a.percentage;
      if (a.kind === "dirty-limit") limitPagesPerSecond = (a.mbPerSecond * 2 ** 20) / PAGE_SIZE;
    }
    if (verdict.kind === "fail") return end("not-converged", verdict.message, null, t);
    if (verdict.kind === "switchover") {
      // Stop-and-copy: the guest is paused at once, a last sync finds next to nothing more, and what this one found goes.
      const downNs = syncHostNs(p.mechanism, p.costs, N, 0).sync + ((dirty * NORMAL_PAGE_BYTES) / B) * 1e9 + cfg.latencyNs;
      transferred += dirty * NORMAL_PAGE_BYTES;
      const why = verdict.forced ? "the switchover was forced" : `${(state.remainingBytes / 2 ** 20).toFixed(1)} MiB dirty <= threshold ${(thresholdBytes / 2 ** 20).toFixed(1)} MiB`;
      return end("switchover", `switchover after sync ${state.round}: ${why}`, downNs / 1e6, t + downNs);
    }
    if (verdict.kind === "postcopy") {
      // The guest moves at once; its missing pages follow at the link's rate.
      const downNs = cfg.latencyNs;
      transferred += dirty * NORMAL_PAGE_BYTES;
      return end("postcopy", `post-copy after sync ${state.round}: the remaining ${(state.remainingBytes / 2 ** 20).toFixed(1)} MiB follow the guest`, downNs / 1e6, t + ((dirty * NORMAL_PAGE_BYTES) / B) * 1e9);
    }
    pages = dirty;
  }
  return end("not-converged", `no end after ${MAX_ROUNDS} rounds: the dirty rate keeps pace with the link and no timeout is set`, null, t);
}
