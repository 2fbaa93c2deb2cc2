/**
 * KubeVirt's two limits on a migration, in guest time, evaluated whenever
 * the controller looks (between chunks and between guest steps), not only at
 * syncs: the progress timeout and the completion timeout (a duration per GiB
 * of guest memory). Progress is as KubeVirt's migration monitor judges it
 * (virt-launcher's processInflightMigration without stall detection): at
 * each look at libvirt's dataRemaining, QEMU's ram.remaining (the bytes a sync
 * found dirty, falling as the pass sends them), the migration progressed if
 * it is lower than at the previous look. A sync raises it, so what the
 * timeout catches is a pass that stops moving, not a workload that keeps
 * re-dirtying memory: that one runs into the completion timeout.
 *
 * At the completion timeout KubeVirt aborts, unless the policy allows
 * post-copy (it then starts post-copy) or workload disruption (it pauses the
 * guest so that the migration completes). Those two act at the next sync,
 * where a switch can begin; aborting acts at once.
 */
import { CONTINUE, type Decision, type MigrationPolicy, type SyncState } from "./policy.js";

const MiB = (b: number) => `${(b / 2 ** 20).toFixed(1)} MiB`;

interface KubevirtTimeoutsConfig {
  progressTimeoutS: number;
  completionTimeoutPerGiBS: number;
  completionTimeoutAction: "abort" | "postcopy" | "pause";
}

export class KubevirtTimeouts implements MigrationPolicy {
  readonly name = "kubevirt-timeouts";
  /** The remaining bytes at the previous look, and when they last fell. */
  private previous = Infinity;
  private progressAt = 0;
  private remainingBytes = 0;
  /** For the messages: what the last sync found dirty (at the start: all of memory), and its rate. */
  private syncedBytes = 0;
  private dirtyRatePagesPerSecond = 0;

  constructor(
    private readonly cfg: KubevirtTimeoutsConfig,
    private readonly memoryBytes: number,
    private readonly thresholdBytes: number,
    private readonly linkBytesPerSecond: number,
  ) {
    this.syncedBytes = memoryBytes;
    this.onSent(memoryBytes, 0);
  }

  get completionLimitNs(): number {
    return (this.cfg.completionTimeoutPerGiBS * 1e9 * this.memoryBytes) / 2 ** 30;
  }

  onSync(s: SyncState): Decision {
    this.syncedBytes = s.remainingBytes;
    this.dirtyRatePagesPerSecond = s.dirtyRatePagesPerSecond;
    this.onSent(s.remainingBytes, s.nowNs);
    if (s.nowNs >= this.completionLimitNs && this.cfg.completionTimeoutAction === "postcopy") return { kind: "postcopy" };
    if (s.nowNs >= this.completionLimitNs && this.cfg.completionTimeoutAction === "pause") return { kind: "switchover", forced: true };
    return this.check(s.nowNs);
  }

  /**
   * at is when the value is reached: for a chunk, the end of its
   * transmission, since the remaining bytes fall all along it, so that a
   * chunk slower than the progress timeout is progress.
   */
  onSent(remainingBytes: number, at: number): void {
    this.remainingBytes = remainingBytes;
    if (remainingBytes < this.previous) this.progressAt = at;
    this.previous = remainingBytes;
  }

  nextDeadlineNs(): number {
    const completion = this.cfg.completionTimeoutAction === "abort" ? this.completionLimitNs : Infinity;
    return Math.min(completion, this.progressAt + this.cfg.progressTimeoutS * 1e9);
  }

  check(now: number): Decision {
    if (now >= this.completionLimitNs && this.cfg.completionTimeoutAction === "abort") {
      return {
        kind: "fail",
        failure: "not-converged",
        message:
          `did not converge: ${(now / 1e9).toFixed(1)} s reached the completion timeout of ${this.cfg.completionTimeoutPerGiBS} s per GiB ` +
          `(${(this.completionLimitNs / 1e9).toFixed(1)} s for ${(this.memoryBytes / 2 ** 30).toFixed(2)} GiB); ` +
          `the last sync found ${MiB(this.syncedBytes)} dirty against a threshold of ${MiB(this.thresholdBytes)} (dirty rate ${Math.round(this.dirtyRatePagesPerSecond)} pages/s)`,
      };
    }
    if (now - this.progressAt >= this.cfg.progressTimeoutS * 1e9) {
      return {
        kind: "fail",
        failure: "not-converged",
        message:
          `did not converge: no progress for ${this.cfg.progressTimeoutS} s (the remaining bytes have not fallen since; ${MiB(this.remainingBytes)} remain; ` +
          `threshold ${MiB(this.thresholdBytes)}, dirty rate ${Math.round(this.dirtyRatePagesPerSecond)} pages/s = ${MiB(this.dirtyRatePagesPerSecond * 4096)}/s ` +
          `against a link of ${MiB(this.linkBytesPerSecond)}/s)`,
      };
    }
    return CONTINUE;
  }
}
