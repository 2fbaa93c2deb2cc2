/** What a migration is given and what it reports (QEMU's query-migrate names where they exist). */
import type { HypervisorClient } from "../../services/hypervisor/client.js";
import type { Mechanism } from "./trackers/mechanism.js";

/** QEMU's auto-converge parameters (policies/auto-converge.ts). */
export interface AutoConvergeConfig {
  throttleTriggerThreshold: number;
  cpuThrottleInitial: number;
  cpuThrottleIncrement: number;
  cpuThrottleTailslow: boolean;
  maxCpuThrottle: number;
}

/** QEMU's dirty-limit parameters (policies/dirty-limit.ts). */
export interface DirtyLimitConfig {
  throttleTriggerThreshold: number;
  /** vcpu-dirty-limit, MB/s. */
  vcpuDirtyLimitMBps: number;
  /** x-vcpu-dirty-limit-period, ms. */
  periodMs: number;
}

/** Post-copy (policies/postcopy.ts, phases/postcopy.ts). */
export interface PostcopyConfig {
  /**
   * When to switch: after this many syncs; null: when a sync finds no fewer
   * bytes dirty than the one before; or only at the completion timeout
   * (KubeVirt's allowPostCopy, with completionTimeoutAction "postcopy").
   */
  afterRounds: number | null | "completion-timeout";
  /** QEMU's postcopy-preempt: page requests go on a channel of their own instead of queueing behind the pages being pushed. */
  preempt: boolean;
}

export interface MigrationConfig {
  sourceVm: string;
  destinationVm: string;
  mechanism: Mechanism;
  bandwidthBitsPerSecond: number;
  latencyNs: number;
  downtimeLimitMs: number;
  /** null: no cap (QEMU). A number forces the switchover after that many syncs (Xen's last iteration). */
  maxRounds: number | null;
  /** Fail when the remaining bytes have not reached a new low for this long (KubeVirt: 150 s). */
  progressTimeoutS: number;
  /** Fail when the migration takes longer than this many seconds per GiB of guest memory (KubeVirt: 150 s). */
  completionTimeoutPerGiBS: number;
  /**
   * What the completion timeout does, as KubeVirt's migration monitor: abort
   * (the default); switch to post-copy (allowPostCopy); or pause the guest so
   * that the migration completes by stop-and-copy (allowWorkloadDisruption
   * without post-copy).
   */
  completionTimeoutAction: "abort" | "postcopy" | "pause";
  /** Pages per read/write/CLEAR chunk; a multiple of 64. */
  chunkPages: number;
  /**
   * Wall-clock bound on waiting for a hypervisor: the deadline of ordinary
   * calls, and how soon keepalive finds a peer that stopped answering. Bulk
   * calls (guest steps, page streams, digests) get six times as long, at least a minute.
   */
  rpcTimeoutMs: number;
  /** QEMU's auto-converge with its parameters (policies/auto-converge.ts); null: off, QEMU's default. */
  autoConverge: AutoConvergeConfig | null;
  /** QEMU's dirty-limit with its parameters (policies/dirty-limit.ts); null: off. Needs the dirty ring; excludes auto-converge. */
  dirtyLimit: DirtyLimitConfig | null;
  /** Post-copy allowed (QEMU's postcopy-ram and migrate-start-postcopy); null: pre-copy only, QEMU's default. */
  postcopy: PostcopyConfig | null;
  /**
   * A VMM bug switched on by tests, to show that the verification catches it:
   * Firecracker's multi-slot diff snapshots (PRs #5696/#5705) wrote a slot's
   * pages at the wrong offset when the slot's last page was clean. Here the
   * pages of every slot after the first land one page too high in such a chunk.
   */
  injectSlotOffsetBug?: boolean;
}

export const DEFAULT_CONFIG: Omit<MigrationConfig, "sourceVm" | "destinationVm"> = {
  mechanism: "bitmap",
  bandwidthBitsPerSecond: 10e9,
  latencyNs: 100_000,
  downtimeLimitMs: 300,
  maxRounds: null,
  progressTimeoutS: 150,
  completionTimeoutPerGiBS: 150,
  completionTimeoutAction: "abort",
  chunkPages: 262144,
  rpcTimeoutMs: 10_000,
  autoConverge: null,
  dirtyLimit: null,
  postcopy: null,
};

export interface RoundReport {
  /** 0 is the full copy; round i >= 1 sends what sync i found. */
  round: number;
  /** Pages the sync that opened this round found dirty (round 0: every page). */
  dirtyPages: number;
  pagesSent: number;
  normalPages: number;
  zeroPages: number;
  bytesSent: number;
  /** Guest time the round took, sync included. */
  durationMs: number;
  syncHostMs: number;
  /** Pages dirtied per second of guest time since the previous sync (QEMU's dirty-pages-rate). */
  dirtyRatePagesPerSecond: number;
  /** The same per vCPU, where the mechanism can tell (the dirty ring, as QEMU's vcpu-dirty-rate); null otherwise. */
  vcpuDirtyRatesPagesPerSecond: number[] | null;
  remainingBytes: number;
  thresholdBytes: number;
  expectedDowntimeMs: number;
  /** The time to completion estimated at the sync that opened the round (eta.ts); null: not converging at that rate, round 0, stop-and-copy. */
  etaMs: number | null;
  /** Writes per second the guest achieved during the round (its slowdown shows here). */
  guestWritesPerSecond: number;
  /** KVM_EXIT_DIRTY_RING_FULL exits during the round, and the guest time vCPUs spent stalled on them. */
  ringFullExits: number;
  ringStallMs: number;
  /** Intel PML-full exits and FEAT_HDBSS buffer-full faults during the round. */
  pmlFullExits: number;
  hdbssFullFaults: number;
  /** The sync that ended the migration (a policy failed it there): its figures, nothing sent after it. */
  endedMigration: boolean;
  /** The stop-and-copy round: the source was paused. */
  stopAndCopy: boolean;
  /** The post-copy phase: the guest ran on the destination while the rest of its pages came. */
  postcopy: boolean;
  /** Syncs in the middle of this round's pass (auto-converge's 5 s fallback timer); they count in dirty-sync-count. */
  fallbackSyncs: number;
  /** QEMU's cpu-throttle-percentage while the round ran (auto-converge). */
  cpuThrottlePercentage: number;
  /** QEMU's dirty-limit-throttle-time-per-round and dirty-limit-ring-full-time at the round's sync, µs (0: no limit in service). */
  dirtyLimitThrottleTimePerRoundUs: number;
  dirtyLimitRingFullTimeUs: number;
}

export interface MigrationReport {
  status: "completed" | "failed";
  error?: string;
  source: { address: string; vm: string };
  destination: { address: string; vm: string };
  mechanism: Mechanism;
  drive: "stepped" | "realtime";
  config: Omit<MigrationConfig, "sourceVm" | "destinationVm">;
  /** The policies that decided, in the order they were asked (policies/index.ts). */
  policies: string[];
  memoryBytes: number;
  setupTimeMs: number;
  totalTimeMs: number;
  downtimeMs: number | null;
  expectedDowntimeMs: number | null;
  /** Syncs of the dirty state (QEMU's dirty-sync-count), the final one included. */
  dirtySyncCount: number;
  transferredBytes: number;
  precopyBytes: number;
  downtimeBytes: number;
  normalPages: number;
  zeroPages: number;
  /** Dirty rate at the last sync, pages per second. */
  dirtyRatePagesPerSecond: number;
  /** QEMU's cpu-throttle-percentage at the end of pre-copy (auto-converge; 0: never throttled). */
  cpuThrottlePercentage: number;
  /** The vcpu-dirty-limit in service at the end of pre-copy, MB/s (dirty-limit; 0: never limited), and its figures then, µs. */
  dirtyLimitMBps: number;
  dirtyLimitThrottleTimePerRoundUs: number;
  dirtyLimitRingFullTimeUs: number;
  mbps: number;
  rounds: RoundReport[];
  switchover: { round: number; remainingBytes: number; thresholdBytes: number; forced: boolean; postcopy: boolean } | null;
  /** After a switch to post-copy: what it took (QEMU's postcopy-* fields). */
  postcopy: PostcopyReport | null;
  verification: { sourceSha256: string; destinationSha256: string; match: boolean } | null;
  /** After a failure: what the controller saw when it looked again (null: not looked, or it could not tell). */
  cleanup: CleanupReport | null;
  tracker: Record<string, number>;
  wallTimeMs: number;
}

export interface PostcopyReport {
  /** Guest time from the switch until the last page landed. */
  durationMs: number;
  /** Pages missing on the destination at the switch. */
  missingPages: number;
  /** QEMU's postcopy-requests: page requests the destination's vCPUs raised. */
  requests: number;
  /** Pages sent because they were requested, and pushed in the background. */
  requestedPages: number;
  pushedPages: number;
  /** Copies the destination dropped because the page was already there. */
  duplicatePages: number;
  /** QEMU's postcopy-bytes. */
  bytes: number;
  /** QEMU's postcopy-blocktime: guest time during which every vCPU waited for a page; and per vCPU. */
  blocktimeMs: number;
  vcpuBlocktimeMs: number[];
  preempt: boolean;
}

export interface CleanupReport {
  sourceRunning: boolean | null;
  sourceLogging: boolean | null;
  /** Any vCPU of the source still throttled (auto-converge) or dirty-limited (dirty-limit). */
  sourceThrottled: boolean | null;
  destinationRemoved: boolean | null;
  /** Why a step of the cleanup or a look failed. */
  problems: string[];
}

export interface ProgressEvent {
  /** "send": a chunk of the round in progress went (round is the round being sent). */
  phase: "setup" | "round" | "send" | "switchover" | "postcopy" | "verify" | "done";
  round: number;
  dirtyPages: number;
  remainingBytes: number;
  dirtyRatePagesPerSecond: number;
  expectedDowntimeMs: number;
  elapsedMs: number;
  transferredBytes: number;
  /** Auto-converge's vCPU throttle in force (0: none). */
  cpuThrottlePercentage: number;
  /** Dirty-limit's per-vCPU limit in service, MB/s (0: none). */
  dirtyLimitMBps: number;
  /** At a sync: the guest time the pre-copy still needs at the current dirty rate (eta.ts); null when it does not converge at it, or before the first sync. */
  etaMs?: number | null;
  /** "send": the bytes the round's pass sends in all, and those sent so far. */
  passBytes?: number;
  passSentBytes?: number;
}

export interface Endpoints {
  source: HypervisorClient;
  destination: HypervisorClient;
  onProgress?: (e: ProgressEvent) => void;
  /** Aborting it interrupts the migration (SIGINT, SIGTERM): cleanup runs and a MigrationError("interrupted") is thrown. */
  signal?: AbortSignal;
}

