/**
 * KubeVirt's two limits on a migration, in guest time, evaluated whenever
 * the controller looks (between chunks and between guest steps), not only at
 * syncs: the progress timeout (no new low of the remaining bytes for that
 * long) and the completion timeout (a duration per GiB of guest memory).
 * Progress is QEMU's ram.remaining as libvirt reports it: the bytes a sync
 * found dirty, falling as the pass sends them; a new low of it resets the
 * progress clock, as KubeVirt's progress watermark does.
 */
import { MigrationError } from "./errors.js";

const MiB = (b: number) => `${(b / 2 ** 20).toFixed(1)} MiB`;

export class MigrationLimits {
  private best = Infinity;
  private bestAt = 0;
  remainingBytes = 0;
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
  update(remainingBytes: number, at = this.now()): void {
    this.remainingBytes = remainingBytes;
    if (remainingBytes < this.best) {
      this.best = remainingBytes;
      this.bestAt = at;
    }
  }

  /** Guest time at which a limit would fire if nothing changes. */
  nextDeadlineNs(): number {
    return Math.min(this.completionLimitNs, this.bestAt + this.cfg.progressTimeoutS * 1e9);
  }

  check(): void {
    const now = this.now();
    if (now >= this.completionLimitNs) {
      throw new MigrationError(
        "not-converged",
        `did not converge: ${(now / 1e9).toFixed(1)} s reached the completion timeout of ${this.cfg.completionTimeoutPerGiBS} s per GiB ` +
          `(${(this.completionLimitNs / 1e9).toFixed(1)} s for ${(this.memoryBytes / 2 ** 30).toFixed(2)} GiB); ` +
          `${MiB(this.remainingBytes)} still to send against a threshold of ${MiB(this.thresholdBytes)} (dirty rate ${Math.round(this.dirtyRatePagesPerSecond)} pages/s)`,
      );
    }
    if (now - this.bestAt >= this.cfg.progressTimeoutS * 1e9) {
      throw new MigrationError(
        "not-converged",
        `did not converge: no progress for ${this.cfg.progressTimeoutS} s (remaining bytes have not gone below ${MiB(this.best)}; ` +
          `threshold ${MiB(this.thresholdBytes)}, dirty rate ${Math.round(this.dirtyRatePagesPerSecond)} pages/s = ${MiB(this.dirtyRatePagesPerSecond * 4096)}/s ` +
          `against a link of ${MiB(this.linkBytesPerSecond)}/s)`,
      );
    }
  }
}
