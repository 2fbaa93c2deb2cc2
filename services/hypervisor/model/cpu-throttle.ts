/**
 * QEMU's vCPU throttle (softmmu/cpu-throttle.c), the lever auto-converge
 * pulls: a timer fires every CPU_THROTTLE_TIMESLICE_NS / (1 - pct) and each
 * vCPU then sleeps pct / (1 - pct) x CPU_THROTTLE_TIMESLICE_NS, so that in
 * every period it sleeps pct of the time and runs one 10 ms timeslice. The
 * periods start when the throttle is set; QEMU accepts 1-99 %.
 */
export const CPU_THROTTLE_TIMESLICE_NS = 10_000_000;
export const CPU_THROTTLE_PCT_MAX = 99;

export class CpuThrottle {
  /** One period of the throttle timer. */
  readonly periodNs: number;
  /** What the vCPU sleeps at the start of each period. */
  readonly sleepNs: number;

  constructor(
    readonly percentage: number,
    /** Guest time of the first timer tick. */
    readonly startNs: number,
  ) {
    const pct = percentage / 100;
    this.periodNs = CPU_THROTTLE_TIMESLICE_NS / (1 - pct);
    this.sleepNs = (pct / (1 - pct)) * CPU_THROTTLE_TIMESLICE_NS;
  }

  /** At guest time t: asleep until `until`, or running until `until` (the next tick). */
  phase(t: number): { asleep: boolean; until: number } {
    const k = Math.floor(Math.max(0, t - this.startNs) / this.periodNs);
    const periodStart = this.startNs + k * this.periodNs;
    const wake = periodStart + this.sleepNs;
    return t < wake ? { asleep: true, until: wake } : { asleep: false, until: periodStart + this.periodNs };
  }
}
