/**
 * Guest workloads: each vCPU runs one, a deterministic stream of page indices
 * (pages of the VM's writable memslots taken in slot order) at a demanded
 * write rate. Pages are produced in batches so the write loop stays tight.
 */
import { invalidArgument } from "../../../common/errors.js";
import { Rng } from "./rng.js";
import { ZipfSampler } from "./zipf.js";

/** GetVcpuState's generator layout: version, sfc32 state (4 x u32), sequential position (u64), queued page indices (u32 each). */
const STATE_VERSION = 1;
const STATE_HEADER = 1 + 16 + 8;

export type Pattern = "idle" | "uniform" | "hot-cold" | "sequential" | "zipf";
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
  /** ZIPF: the exponent s; page of rank k is written with probability proportional to 1 / k^s. */
  zipfSkew: number;
  /** Guest reads per second over the same pattern (they matter only in post-copy). */
  readsPerSecond: number;
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
  zipfSkew: 0.99,
  readsPerSecond: 0,
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
  protected readonly rng: Rng;
  protected readonly first: number;
  protected readonly size: number;
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

  /** This generator's position (see STATE_VERSION's layout). */
  save(): Uint8Array {
    const queued = BATCH - this.cursor;
    const out = new Uint8Array(STATE_HEADER + 4 * queued);
    const dv = new DataView(out.buffer);
    dv.setUint8(0, STATE_VERSION);
    this.rng.save().forEach((w, i) => dv.setUint32(1 + 4 * i, w >>> 0, true));
    dv.setBigUint64(17, BigInt(this.seqPos), true);
    for (let i = 0; i < queued; i++) dv.setUint32(STATE_HEADER + 4 * i, this.batch[this.cursor + i], true);
    return out;
  }

  /** Continues from a saved position; refuses one that does not fit this VM's pages. */
  restore(state: Uint8Array, what: string): void {
    const bad = (why: string) => invalidArgument(`${what}: generator state ${why}`, "EINVAL");
    if (state.byteLength < STATE_HEADER || (state.byteLength - STATE_HEADER) % 4 !== 0) throw bad(`of ${state.byteLength} bytes is malformed`);
    const dv = new DataView(state.buffer, state.byteOffset, state.byteLength);
    if (dv.getUint8(0) !== STATE_VERSION) throw bad(`version ${dv.getUint8(0)} is not ${STATE_VERSION}`);
    const queued = (state.byteLength - STATE_HEADER) / 4;
    if (queued > BATCH) throw bad(`queues ${queued} pages, more than a batch (${BATCH})`);
    const seqPos = Number(dv.getBigUint64(17, true));
    if (this.size > 0 && seqPos >= this.size) throw bad(`position ${seqPos} is past the working set (${this.size} pages)`);
    const cursor = BATCH - queued;
    for (let i = 0; i < queued; i++) {
      const page = dv.getUint32(STATE_HEADER + 4 * i, true);
      if (page < this.first || page >= this.first + this.size) throw bad(`queues page ${page}, outside the working set [${this.first}, ${this.first + this.size})`);
      this.batch[cursor + i] = page;
    }
    this.rng.restore([1, 5, 9, 13].map((o) => dv.getUint32(o, true)));
    this.seqPos = seqPos;
    this.cursor = cursor;
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

/**
 * The key-value store's generator: the Zipf ranks (zipf.ts) scattered over
 * the working set. A class of its own rather than a case of refill(): a
 * larger refill cost the other patterns' write loop 15% in the bench.
 */
class ZipfGen extends WorkloadGen {
  private readonly zipf: ZipfSampler;

  constructor(spec: WorkloadSpec, totalPages: number, seed: bigint, vcpuIndex: number, vcpuCount: number) {
    super(spec, totalPages, seed, vcpuIndex, vcpuCount);
    this.zipf = new ZipfSampler(Math.max(1, this.size), spec.zipfSkew);
  }

  override refill(): void {
    this.zipf.fill(this.batch, this.rng, this.first);
    this.cursor = 0;
  }
}

/** The generator for spec: each pattern's stream of pages. */
export function workloadGen(spec: WorkloadSpec, totalPages: number, seed: bigint, vcpuIndex: number, vcpuCount: number): WorkloadGen {
  return spec.pattern === "zipf" ? new ZipfGen(spec, totalPages, seed, vcpuIndex, vcpuCount) : new WorkloadGen(spec, totalPages, seed, vcpuIndex, vcpuCount);
}
