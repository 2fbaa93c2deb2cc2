/**
 * Guest workloads: each vCPU runs one, a deterministic stream of page indices
 * (pages of the VM's writable memslots taken in slot order) at a demanded
 * write rate. Pages are produced in batches so the write loop stays tight.
 */
import { Rng } from "./rng.js";

export type Pattern = "idle" | "uniform" | "hot-cold" | "sequential";
export type ValueMode = "sequence" | "epoch";

export interface WorkloadSpec {
  pattern: Pattern;
  /** Demanded guest writes per second of guest time, per vCPU. */
  writesPerSecond: number;
  firstPage: number;
  /** 0: to the end of the VM's writable pages. */
  pages: number;
  hotFraction: number;
  hotWriteFraction: number;
  value: ValueMode;
  epoch: bigint;
  seed: bigint;
}

export const IDLE: WorkloadSpec = Object.freeze({
  pattern: "idle",
  writesPerSecond: 0,
  firstPage: 0,
  pages: 0,
  hotFraction: 0.1,
  hotWriteFraction: 0.9,
  value: "sequence",
  epoch: 0n,
  seed: 0n,
}) as WorkloadSpec;

export const BATCH = 1024;

export class WorkloadGen {
  /** Page indices; a VM holds at most 2^32 writable pages (16 TiB). */
  readonly batch = new Uint32Array(BATCH);
  /** Next unread index in batch; BATCH means empty. */
  cursor = BATCH;
  private readonly rng: Rng;
  private readonly first: number;
  private readonly size: number;
  private readonly hotSize: number;
  private seqPos: number;
  /** EPOCH mode's value as the two 32-bit words a write stores. */
  readonly epochLo: number;
  readonly epochHi: number;

  constructor(
    readonly spec: WorkloadSpec,
    totalPages: number,
    seed: bigint,
    vcpuIndex: number,
    vcpuCount: number,
  ) {
    this.rng = new Rng(seed);
    this.first = spec.firstPage;
    this.size = spec.pages || totalPages - spec.firstPage;
    this.hotSize = Math.max(1, Math.floor(this.size * spec.hotFraction));
    this.seqPos = Math.floor((this.size * vcpuIndex) / Math.max(1, vcpuCount));
    this.epochLo = Number(spec.epoch & 0xffffffffn) | 0;
    this.epochHi = Number((spec.epoch >> 32n) & 0xffffffffn) | 0;
  }

  get active(): boolean {
    return this.spec.pattern !== "idle" && this.spec.writesPerSecond > 0 && this.size > 0;
  }

  refill(): void {
    const out = this.batch;
    const rng = this.rng;
    const first = this.first;
    const size = this.size;
    switch (this.spec.pattern) {
      case "uniform":
        for (let i = 0; i < BATCH; i++) out[i] = first + rng.below(size);
        break;
      case "hot-cold": {
        const hot = this.hotSize;
        const cold = size - hot;
        const pHot = cold > 0 ? this.spec.hotWriteFraction : 1;
        for (let i = 0; i < BATCH; i++) {
          out[i] = rng.nextFloat() < pHot ? first + rng.below(hot) : first + hot + rng.below(cold);
        }
        break;
      }
      case "sequential": {
        let pos = this.seqPos;
        for (let i = 0; i < BATCH; i++) {
          out[i] = first + pos;
          if (++pos === size) pos = 0;
        }
        this.seqPos = pos;
        break;
      }
      case "idle":
        out.fill(first);
        break;
    }
    this.cursor = 0;
  }
}
