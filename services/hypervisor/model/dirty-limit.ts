/**
 * QEMU's dirty page rate limit (system/dirtylimit.c, QEMU 7.1; the migration
 * capability dirty-limit, 8.1), the VMM half that sits beside KVM's dirty
 * ring. A stat thread measures each vCPU's dirty rate over a period (1000 ms,
 * or x-vcpu-dirty-limit-period, 1-1000 ms, during a migration) from the
 * pages its ring logged, and nudges the vCPU's throttle_us_per_full: the time
 * its thread sleeps each time it comes out of KVM_EXIT_DIRTY_RING_FULL
 * (kvm_cpu_exec: reap that vCPU's ring, then dirtylimit_vcpu_execute).
 * A limit only bites through full rings, so it needs the ring, and how finely
 * it bites depends on the ring's size.
 *
 * The adjustment is QEMU's: nothing within 25 MB/s of the quota; a step of
 * ring_full_time x pct / (100 - pct) when the error is over 50%, else a
 * tenth of ring_full_time; ring_full_time is the ring's MiB over the highest
 * rate seen; the sleep stays within [0, 99 x ring_full_time]. Rates are MB/s
 * as QEMU counts them: (pages x 4 KiB >> 20) x 1000 / period_ms, in integers.
 */
import { failedPrecondition, invalidArgument } from "../../../common/errors.js";
import type { Vcpu } from "./vcpu.js";

/** DIRTYLIMIT_TOLERANCE_RANGE, MB/s. */
const TOLERANCE_MBPS = 25;
/** DIRTYLIMIT_LINEAR_ADJUSTMENT_PCT. */
const LINEAR_ADJUSTMENT_PCT = 50;
/** DIRTYLIMIT_THROTTLE_PCT_MAX. */
const THROTTLE_PCT_MAX = 99;
/** DIRTYLIMIT_CALC_TIME_MS, and the range of x-vcpu-dirty-limit-period. */
export const DEFAULT_PERIOD_MS = 1000;
const MAX_PERIOD_MS = 1000;

const PAGE_SHIFT = 12;

/** One vCPU's limit (VcpuDirtyLimitState and CPUState's throttle_us_per_full). */
export interface VcpuDirtyLimit {
  /** The quota, MB/s. */
  quotaMBps: number;
  /** What the last period measured, MB/s (vcpu_dirty_rate_get). */
  currentMBps: number;
  throttleUsPerFull: number;
  /** pagesDirtied at the start of the period. */
  pagesAt: number;
}

export class DirtyLimiter {
  /** Guest time the current measurement period ends. */
  nextNs: number;
  /** dirtylimit_dirty_ring_full_time's static max_dirtyrate: the highest rate any vCPU showed. */
  private maxMBps = 0;

  constructor(
    readonly periodMs: number,
    nowNs: number,
    private readonly ringEntries: number,
  ) {
    this.nextNs = nowNs + periodMs * 1e6;
  }

  /** The ring's size in MiB (qemu_target_pages_to_MiB). */
  private get ringMiB(): number {
    return (this.ringEntries << PAGE_SHIFT) >>> 20;
  }

  /** dirtylimit_dirty_ring_full_time: µs to fill a ring at the highest rate seen, given one just measured. */
  ringFullTimeUs(rateMBps: number): number {
    if (this.maxMBps < rateMBps) this.maxMBps = rateMBps;
    return this.maxMBps > 0 ? Math.floor((this.ringMiB * 1e6) / this.maxMBps) : 0;
  }

  /** The stat thread's period ended at guest time now: measure every vCPU, adjust the limited ones. */
  tick(vcpus: readonly Vcpu[], now: number): void {
    for (const v of vcpus) {
      const l = v.dirtyLimit;
      if (!l) continue;
      const pages = v.total.pagesDirtied - l.pagesAt;
      l.pagesAt = v.total.pagesDirtied;
      l.currentMBps = Math.floor((Math.floor((pages * 2 ** PAGE_SHIFT) / 2 ** 20) * 1000) / this.periodMs);
      if (Math.abs(l.quotaMBps - l.currentMBps) > TOLERANCE_MBPS) this.adjust(l);
    }
    this.nextNs = now + this.periodMs * 1e6;
  }

  /** dirtylimit_set_throttle. */
  private adjust(l: VcpuDirtyLimit): void {
    const { quotaMBps: quota, currentMBps: current } = l;
    if (current === 0) {
      l.throttleUsPerFull = 0;
      return;
    }
    const full = this.ringFullTimeUs(current);
    const hi = Math.max(quota, current);
    const diff = Math.abs(quota - current);
    let step: number;
    if (Math.floor((diff * 100) / hi) > LINEAR_ADJUSTMENT_PCT) {
      const pct = Math.floor((diff * 100) / (quota < current ? current : quota));
      step = Math.floor((full * pct) / (100 - pct));
    } else step = Math.floor(full / 10);
    l.throttleUsPerFull += quota < current ? step : -step;
    l.throttleUsPerFull = Math.max(0, Math.min(l.throttleUsPerFull, full * THROTTLE_PCT_MAX));
  }

  /** dirtylimit_throttle_time_per_round: the longest sleep per full ring of any vCPU, µs. */
  throttleTimePerRoundUs(vcpus: readonly Vcpu[]): number {
    return Math.max(0, ...vcpus.map((v) => v.dirtyLimit?.throttleUsPerFull ?? 0));
  }

  /** dirtylimit_ring_full_time: the time to fill a ring at the running vCPUs' mean rate, µs (0: nothing dirtied). */
  ringFullTimeAtMeanUs(vcpus: readonly Vcpu[]): number {
    const running = vcpus.filter((v) => !v.paused);
    const sum = running.reduce((n, v) => n + (v.dirtyLimit?.currentMBps ?? 0), 0);
    return sum > 0 ? this.ringFullTimeUs(Math.floor(sum / running.length)) : 0;
  }
}

/**
 * qmp_set_vcpu_dirty_limit / qmp_cancel_vcpu_dirty_limit on vcpus (every
 * vCPU when all): rate 0 cancels. Returns the limiter the VM keeps (null once
 * no vCPU is limited, as dirtylimit_cleanup ends the stat thread).
 */
export function setVcpuDirtyLimit(
  limiter: DirtyLimiter | null,
  vm: { name: string; ringEntries: number; clockNs: number; vcpus: readonly Vcpu[] },
  vcpus: readonly Vcpu[],
  rateMBps: number,
  periodMs: number,
): DirtyLimiter | null {
  const what = "set vcpu dirty limit";
  if (vm.ringEntries === 0) throw failedPrecondition(`${what}: dirty page limit feature requires KVM with accelerator property 'dirty-ring-size' set (VM ${vm.name} has no dirty ring)`, "EINVAL");
  if (!Number.isSafeInteger(rateMBps) || rateMBps < 0) throw invalidArgument(`${what}: dirty rate ${rateMBps} MB/s must be a whole number >= 0 (0 cancels)`, "EINVAL");
  if (!Number.isInteger(periodMs) || periodMs < 1 || periodMs > MAX_PERIOD_MS) {
    throw invalidArgument(`${what}: x-vcpu-dirty-limit-period ${periodMs} ms must be in [1, ${MAX_PERIOD_MS}]`, "EINVAL");
  }
  if (rateMBps === 0) {
    for (const v of vcpus) {
      v.dirtyLimit = null;
      v.limitSleepUntil = 0;
    }
    return vm.vcpus.some((v) => v.dirtyLimit) ? limiter : null;
  }
  const l = limiter && limiter.periodMs === periodMs ? limiter : new DirtyLimiter(periodMs, vm.clockNs, vm.ringEntries);
  for (const v of vcpus) {
    if (v.dirtyLimit) v.dirtyLimit.quotaMBps = rateMBps;
    else v.dirtyLimit = { quotaMBps: rateMBps, currentMBps: 0, throttleUsPerFull: 0, pagesAt: v.total.pagesDirtied };
  }
  return l;
}
