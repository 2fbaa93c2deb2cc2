/**
 * The seam every migration policy plugs into. After each sync of the dirty
 * state (QEMU's migration_bitmap_sync and the decision migration_iteration_run
 * takes after it) each policy sees the same state and decides; between chunks
 * and guest steps a policy with a deadline (a timeout) may end the migration.
 * Policies are asked in order: the first decision that ends pre-copy wins, and
 * the ones that act on the guest (throttle, dirty limit) are applied on the way.
 */
import type { FailureKind } from "../errors.js";

export interface SyncState {
  /** dirty-sync-count, this sync included. */
  round: number;
  /** Guest time of the sync. */
  nowNs: number;
  dirtyPages: number;
  remainingBytes: number;
  /** QEMU's threshold_size: bandwidth x downtime limit. */
  thresholdBytes: number;
  /** Since the previous sync (QEMU's dirty-pages-rate). */
  dirtyRatePagesPerSecond: number;
  /** Per vCPU since the previous sync, where the mechanism can tell (the dirty ring); null otherwise. */
  vcpuDirtyRatesPagesPerSecond: number[] | null;
  /** Bytes sent so far (QEMU's ram transferred). */
  transferredBytes: number;
}

export type Decision =
  | { kind: "continue" }
  /** QEMU's cpu_throttle_set on every vCPU. */
  | { kind: "throttle"; percentage: number }
  /** QEMU's set-vcpu-dirty-limit on every vCPU, in MB/s. */
  | { kind: "dirty-limit"; mbPerSecond: number }
  | { kind: "switchover"; forced: boolean }
  | { kind: "postcopy" }
  | { kind: "fail"; failure: FailureKind; message: string };

export const CONTINUE: Decision = { kind: "continue" };

export interface MigrationPolicy {
  readonly name: string;
  /** Evaluated inside every sync, the fallback syncs in the middle of a pass included (QEMU's throttle trigger). */
  readonly actsOnGuest?: boolean;
  onSync?(s: SyncState): Decision;
  /** As a pass sends: the remaining bytes fall to remainingBytes by guest time atNs. */
  onSent?(remainingBytes: number, atNs: number): void;
  /** Guest time at which check() would end the migration if nothing changes. */
  nextDeadlineNs?(): number;
  check?(nowNs: number): Decision;
}

/** Decisions that act on the guest and let pre-copy go on. */
export function actsOnGuest(d: Decision): d is Extract<Decision, { kind: "throttle" | "dirty-limit" }> {
  return d.kind === "throttle" || d.kind === "dirty-limit";
}
