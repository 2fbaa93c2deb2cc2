/**
 * QEMU's migration_trigger_throttle (migration/ram.c), shared by
 * auto-converge and dirty-limit: at a sync that closes a period of more than
 * a second, the bytes dirtied in the period are compared with
 * throttle-trigger-threshold % of the bytes transferred in it; the second
 * time they are above it (a period below it does not reset the count) the
 * guest is to be slowed down.
 */
const PAGE_SIZE = 4096;
/** A period must last more than this before the trigger is evaluated (migration_bitmap_sync). */
const PERIOD_NS = 1e9;

interface Fired {
  bytesDirty: number;
  bytesDirtyThreshold: number;
}

export class ThrottleTrigger {
  private periodStartNs: number;
  private bytesXferPrev = 0;
  private dirtyPagesPeriod = 0;
  private dirtyRateHighCount = 0;

  constructor(
    private readonly thresholdPct: number,
    startNs: number,
  ) {
    this.periodStartNs = startNs;
  }

  /** A sync at guest time nowNs found dirtyPages dirty, with transferredBytes sent so far: fired, or null. */
  onSync(nowNs: number, dirtyPages: number, transferredBytes: number): Fired | null {
    this.dirtyPagesPeriod += dirtyPages;
    if (nowNs - this.periodStartNs <= PERIOD_NS) return null;
    const bytesDirty = this.dirtyPagesPeriod * PAGE_SIZE;
    const bytesDirtyThreshold = ((transferredBytes - this.bytesXferPrev) * this.thresholdPct) / 100;
    this.periodStartNs = nowNs;
    this.dirtyPagesPeriod = 0;
    this.bytesXferPrev = transferredBytes;
    if (!(bytesDirty > bytesDirtyThreshold && ++this.dirtyRateHighCount >= 2)) return null;
    this.dirtyRateHighCount = 0;
    return { bytesDirty, bytesDirtyThreshold };
  }
}
