/** A vCPU: its TLB, its workload, its local clock and what it achieved. */
import type { CpuThrottle } from "./cpu-throttle.js";
import type { VcpuDirtyLimit } from "./dirty-limit.js";
import type { DirtyRing } from "./dirty-ring.js";
import { Tlb } from "./tlb.js";
import { WorkloadGen } from "./workload.js";

export interface StepStats {
  writes: number;
  writeFaults: number;
  overheadNs: number;
  mmioExits: number;
  ringFullExits: number;
  /** Guest time stalled on a full dirty ring. */
  ringStallNs: number;
  /** Pages this vCPU dirtied: newly logged by a fault, or made writable-dirty by hardware. */
  pagesDirtied: number;
  /** FEAT_HDBSS: HDBSSF permission faults (the buffer was full), handled inside KVM. */
  hdbssFullFaults: number;
  /** Intel PML: PML-full exits, handled inside KVM. */
  pmlFullExits: number;
  /** Guest time asleep under QEMU's vCPU throttle. */
  throttleNs: number;
  /** Guest time asleep under QEMU's dirty limit (throttle_us_per_full after each full ring). */
  dirtyLimitNs: number;
  /** Exits forced by KickVcpus. */
  kicks: number;
}

const zero = (): StepStats => ({ writes: 0, writeFaults: 0, overheadNs: 0, mmioExits: 0, ringFullExits: 0, ringStallNs: 0, pagesDirtied: 0, hdbssFullFaults: 0, pmlFullExits: 0, throttleNs: 0, dirtyLimitNs: 0, kicks: 0 });

export class Vcpu {
  paused = false;
  /** Local guest time in ns; may run ahead of the VM clock by the tail of one write or a charged cost. */
  time = 0;
  /** Totals since creation. */
  readonly total: StepStats = zero();
  /** What the last AdvanceVm (or real-time tick) did. */
  step: StepStats = zero();
  stepDurationNs = 0;
  /** Out of the guest with KVM_EXIT_DIRTY_RING_FULL until a reset brings the ring under its soft limit. */
  ringFull = false;
  /** QEMU's vCPU throttle, when one is set. */
  throttle: CpuThrottle | null = null;
  /** QEMU's dirty limit on this vCPU, when one is set, and the end of the sleep it owes after a full ring. */
  dirtyLimit: VcpuDirtyLimit | null = null;
  limitSleepUntil = 0;

  constructor(
    readonly index: number,
    readonly tlb: Tlb,
    public gen: WorkloadGen,
    readonly ring: DirtyRing | null,
  ) {}

  /** Bytes of this vCPU's typed arrays: TLB, ring, workload batch. */
  get allocatedBytes(): number {
    return this.tlb.entries.byteLength + (this.ring?.allocatedBytes ?? 0) + this.gen.batch.byteLength;
  }

  beginStep(): void {
    this.step = zero();
  }

  /** Writes per second of guest time over the last step. */
  get achievedWritesPerSecond(): number {
    return this.stepDurationNs > 0 ? (this.step.writes * 1e9) / this.stepDurationNs : 0;
  }

  count(d: Partial<StepStats>): void {
    for (const k of Object.keys(d) as (keyof StepStats)[]) {
      this.step[k] += d[k]!;
      this.total[k] += d[k]!;
    }
  }

  /** A run's writes, faults and tracking overhead (once per vCPU per quantum: no object, no walk over keys). */
  ran(writes: number, faults: number, overheadNs: number): void {
    const s = this.step;
    const t = this.total;
    s.writes += writes;
    t.writes += writes;
    s.writeFaults += faults;
    t.writeFaults += faults;
    s.overheadNs += overheadNs;
    t.overheadNs += overheadNs;
  }

  /** One page dirtied (on the fault and hardware-update paths: no allocation). */
  dirtied(): void {
    this.step.pagesDirtied++;
    this.total.pagesDirtied++;
  }

  /** Stalls on a full ring from `from` to `until` (guest time passes, no guest work). */
  stall(from: number, until: number): void {
    if (until > from) this.count({ ringStallNs: until - from });
    this.time = Math.max(this.time, until);
  }
}
