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
 */
import { MigrationError } from "./errors.js";

const MiB = (b: number) => `${(b / 2 ** 20).toFixed(1)} MiB`;

export class MigrationLimits {
  /** The remaining bytes at the previous look, and when they last fell. */
  private previous = Infinity;
  private progressAt = 0;
  remainingBytes = 0;
  /** What the last sync found dirty (at the start: all of memory), for the messages. */
  private syncedBytes = 0;
  /** For the messages: the last sync's rate and the link. */
  dirtyRatePagesPerSecond = 0;

  constructor(
    private readonly now: () => number,
    private readonly cfg: { progressTimeoutS: number; completionTimeoutPerGiBS: number },
    private readonly memoryBytes: number,
    private readonly thresholdBytes: number,
    private readonly linkBytesPerSecond: number,
  ) {}

  get completionLimitNs(): number {
    return (this.cfg.completionTimeoutPerGiBS * 1e9 * this.memoryBytes) / 2 ** 30;
  }

  /**
   * The remaining bytes: at a sync, and as each chunk a pass sends goes out
   * (at the start: all of memory). at is when that value is reached: for a
   * chunk, the end of its transmission, since the remaining bytes fall all
   * along it, so that a chunk slower than the progress timeout is progress.
   */
  /** A sync found remainingBytes dirty. */
  synced(remainingBytes: number): void {
    this.syncedBytes = remainingBytes;
    this.update(remainingBytes);
  }

  update(remainingBytes: number, at = this.now()): void {
    this.remainingBytes = remainingBytes;
    if (remainingBytes < this.previous) this.progressAt = at;
    this.previous = remainingBytes;
  }

  /** Guest time at which a limit would fire if nothing changes. */
  nextDeadlineNs(): number {
    return Math.min(this.completionLimitNs, this.progressAt + this.cfg.progressTimeoutS * 1e9);
  }

  check(): void {
    const now = this.now();
    if (now >= this.completionLimitNs) {
      throw new MigrationError(
        "not-converged",
        `did not converge: ${(now / 1e9).toFixed(1)} s reached the completion timeout of ${this.cfg.completionTimeoutPerGiBS} s per GiB ` +
          `(${(this.completionLimitNs / 1e9).toFixed(1)} s for ${(this.memoryBytes / 2 ** 30).toFixed(2)} GiB); ` +
          `the last sync found ${MiB(this.syncedBytes)} dirty against a threshold of ${MiB(this.thresholdBytes)} (dirty rate ${Math.round(this.dirtyRatePagesPerSecond)} pages/s)`,
      );
    }
    if (now - this.progressAt >= this.cfg.progressTimeoutS * 1e9) {
      throw new MigrationError(
        "not-converged",
        `did not converge: no progress for ${this.cfg.progressTimeoutS} s (the remaining bytes have not fallen since; ${MiB(this.remainingBytes)} remain; ` +
          `threshold ${MiB(this.thresholdBytes)}, dirty rate ${Math.round(this.dirtyRatePagesPerSecond)} pages/s = ${MiB(this.dirtyRatePagesPerSecond * 4096)}/s ` +
          `against a link of ${MiB(this.linkBytesPerSecond)}/s)`,
      );
    }
  }
}
