/** A vCPU: its TLB, its workload, its local clock and what it achieved. */
import { Tlb } from "./tlb.js";
import { WorkloadGen } from "./workload.js";

export interface StepStats {
  writes: number;
  writeFaults: number;
  overheadNs: number;
  mmioExits: number;
}

const zero = (): StepStats => ({ writes: 0, writeFaults: 0, overheadNs: 0, mmioExits: 0 });

export class Vcpu {
  paused = false;
  /** Local guest time in ns; may run ahead of the VM clock by the tail of one write or a charged cost. */
  time = 0;
  /** Totals since creation. */
  readonly total: StepStats = zero();
  /** What the last AdvanceVm (or real-time tick) did. */
  step: StepStats = zero();
  stepDurationNs = 0;

  constructor(
    readonly index: number,
    readonly tlb: Tlb,
    public gen: WorkloadGen,
  ) {}

  beginStep(): void {
    this.step = zero();
  }

  /** Writes per second of guest time over the last step. */
  get achievedWritesPerSecond(): number {
    return this.stepDurationNs > 0 ? (this.step.writes * 1e9) / this.stepDurationNs : 0;
  }

  count(writes: number, faults: number, overheadNs: number, mmio = 0): void {
    this.step.writes += writes;
    this.total.writes += writes;
    this.step.writeFaults += faults;
    this.total.writeFaults += faults;
    this.step.overheadNs += overheadNs;
    this.total.overheadNs += overheadNs;
    this.step.mmioExits += mmio;
    this.total.mmioExits += mmio;
  }
}
