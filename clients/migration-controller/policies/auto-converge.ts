/**
 * QEMU's auto-converge (migration/ram.c: mig_throttle_guest_down): each time
 * the throttle trigger fires (throttle-trigger.ts) the vCPUs are throttled
 * more: cpu-throttle-initial first, then cpu-throttle-increment more each
 * time (with tailslow, at most what would bring the dirty rate down to the
 * threshold), up to max-cpu-throttle.
 */
import type { AutoConvergeConfig } from "../types.js";
import { CONTINUE, type Decision, type MigrationPolicy, type SyncState } from "./policy.js";
import { ThrottleTrigger } from "./throttle-trigger.js";

export type { AutoConvergeConfig };

/** QEMU's defaults (migration/options.c). */
export const QEMU_AUTO_CONVERGE: AutoConvergeConfig = {
  throttleTriggerThreshold: 50,
  cpuThrottleInitial: 20,
  cpuThrottleIncrement: 10,
  cpuThrottleTailslow: false,
  maxCpuThrottle: 99,
};

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
  readonly actsOnGuest = true;
  private readonly fire: ThrottleTrigger;
  /** The throttle in force (0: none), as cpu_throttle_get_percentage. */
  percentage = 0;

  constructor(
    private readonly cfg: AutoConvergeConfig,
    startNs: number,
  ) {
    this.fire = new ThrottleTrigger(cfg.throttleTriggerThreshold, startNs);
  }

  /** QEMU evaluates the trigger inside the sync, before the switchover decision. */
  onSync(s: SyncState): Decision {
    const pct = this.trigger(s.nowNs, s.dirtyPages, s.transferredBytes);
    return pct === null ? CONTINUE : { kind: "throttle", percentage: pct };
  }

  /** The new throttle percentage after a sync, or null for no change. */
  trigger(nowNs: number, dirtyPages: number, transferredBytes: number): number | null {
    const f = this.fire.onSync(nowNs, dirtyPages, transferredBytes);
    return f === null ? null : (this.percentage = this.throttleDown(f.bytesDirty, f.bytesDirtyThreshold));
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
