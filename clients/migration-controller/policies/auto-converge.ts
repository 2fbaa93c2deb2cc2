/**
 * QEMU's auto-converge (migration/ram.c: migration_trigger_throttle and
 * mig_throttle_guest_down). At a sync that closes a period of more than a
 * second, the bytes dirtied in the period are compared with
 * throttle-trigger-threshold % of the bytes transferred in it; the second
 * time they are above it (the count is not reset by a period below it), the
 * vCPUs are throttled: cpu-throttle-initial first, then cpu-throttle-increment
 * more each time (with tailslow, at most what would bring the dirty rate down
 * to the threshold), up to max-cpu-throttle.
 */
import type { AutoConvergeConfig } from "../types.js";
import { CONTINUE, type Decision, type MigrationPolicy, type SyncState } from "./policy.js";

export type { AutoConvergeConfig };


/** QEMU's defaults (migration/options.c). */
export const QEMU_AUTO_CONVERGE: AutoConvergeConfig = {
  throttleTriggerThreshold: 50,
  cpuThrottleInitial: 20,
  cpuThrottleIncrement: 10,
  cpuThrottleTailslow: false,
  maxCpuThrottle: 99,
};

const PAGE_SIZE = 4096;
/** A period must last more than this before the trigger is evaluated (migration_bitmap_sync). */
const PERIOD_NS = 1e9;

/** Why a configuration is refused, naming QEMU's parameter; null when it is valid. */
export function checkAutoConverge(c: AutoConvergeConfig): string | null {
  const pct = (name: string, v: number, lo: number, hi: number) => (Number.isInteger(v) && v >= lo && v <= hi ? null : `${name} must be a whole number in [${lo}, ${hi}] (got ${v})`);
  return (
    pct("throttle-trigger-threshold", c.throttleTriggerThreshold, 1, 100) ??
    pct("cpu-throttle-initial", c.cpuThrottleInitial, 1, 99) ??
    pct("cpu-throttle-increment", c.cpuThrottleIncrement, 1, 99) ??
    pct("max-cpu-throttle", c.maxCpuThrottle, 1, 99)
  );
}

export class AutoConverge implements MigrationPolicy {
  readonly name = "auto-converge";
  private periodStartNs: number;
  private bytesXferPrev = 0;
  private dirtyPagesPeriod = 0;
  private dirtyRateHighCount = 0;
  /** The throttle in force (0: none), as cpu_throttle_get_percentage. */
  percentage = 0;

  constructor(
    private readonly cfg: AutoConvergeConfig,
    startNs: number,
  ) {
    this.periodStartNs = startNs;
  }

  /** QEMU evaluates the trigger inside the sync, before the switchover decision. */
  onSync(s: SyncState): Decision {
    const pct = this.trigger(s.nowNs, s.dirtyPages, s.transferredBytes);
    return pct === null ? CONTINUE : { kind: "throttle", percentage: pct };
  }

  /**
   * A sync at guest time nowNs found dirtyPages pages dirty; transferredBytes
   * have gone so far. Returns the new throttle percentage, or null for no change.
   */
  trigger(nowNs: number, dirtyPages: number, transferredBytes: number): number | null {
    this.dirtyPagesPeriod += dirtyPages;
    if (nowNs - this.periodStartNs <= PERIOD_NS) return null;
    const bytesDirty = this.dirtyPagesPeriod * PAGE_SIZE;
    const bytesDirtyThreshold = ((transferredBytes - this.bytesXferPrev) * this.cfg.throttleTriggerThreshold) / 100;
    this.periodStartNs = nowNs;
    this.dirtyPagesPeriod = 0;
    this.bytesXferPrev = transferredBytes;
    if (!(bytesDirty > bytesDirtyThreshold && ++this.dirtyRateHighCount >= 2)) return null;
    this.dirtyRateHighCount = 0;
    return (this.percentage = this.throttleDown(bytesDirty, bytesDirtyThreshold));
  }

  /** mig_throttle_guest_down. */
  private throttleDown(bytesDirty: number, bytesDirtyThreshold: number): number {
    const c = this.cfg;
    if (this.percentage === 0) return c.cpuThrottleInitial;
    let inc = c.cpuThrottleIncrement;
    if (c.cpuThrottleTailslow) {
      const cpuNow = 100 - this.percentage;
      const cpuIdeal = Math.floor(cpuNow * (bytesDirtyThreshold / bytesDirty));
      inc = Math.min(cpuNow - cpuIdeal, c.cpuThrottleIncrement);
    }
    return Math.min(this.percentage + inc, c.maxCpuThrottle);
  }
}
