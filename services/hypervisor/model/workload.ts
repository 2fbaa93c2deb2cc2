/**
 * Guest workloads: each vCPU runs one, a deterministic stream of page indices
 * (pages of the VM's writable memslots taken in slot order) at a demanded
 * write rate. Pages are produced in batches so the write loop stays tight.
 */
import { invalidArgument } from "../../../common/errors.js";
import { Rng } from "./rng.js";
import { ZipfSampler } from "./zipf.js";

/**
 * GetVcpuState's generator layout: version (u8), sfc32 state (4 x u32),
 * sequential position (u64), guest time since the workload began (f64),
 * the count of phases (u8) and each phase's sequential position (u64 each),
 * then the queued page indices (u32 each).
 */
const STATE_VERSION = 2;
const STATE_HEADER = 1 + 16 + 8 + 8 + 1;

export type Pattern = "idle" | "uniform" | "hot-cold" | "sequential" | "zipf" | "phased" | "trace";

/** A recorded trace: per interval, the pages one vCPU dirtied (pages[offsets[k], offsets[k + 1]) for interval k). */
export interface Trace {
  intervalNs: number;
  pages: Uint32Array;
  offsets: Uint32Array;
}

/** At most this many pages in one vCPU's trace (64 MiB: the gRPC message limit). */
export const MAX_TRACE_PAGES = 16 * 2 ** 20;

/** One phase of a phased workload: its own pattern and rate, for a stretch of guest time. */
export interface WorkloadPhase {
  /** 0 on the last phase only: it lasts for ever (the phases do not repeat). */
  durationNs: number;
  spec: WorkloadSpec;
}

/** At most this many phases in a workload: a cycle is a handful of behaviours, not a trace. */
export const MAX_PHASES = 16;
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
  /** PHASED: the phases in order, repeated unless the last lasts for ever; empty for the other patterns. */
  phases: WorkloadPhase[];
  /** TRACE: the recorded pages replayed; null for the other patterns. */
  trace: Trace | null;
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
  phases: [],
  trace: null,
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
  protected seqPos: number;
  /** Guest time at which the workload began (its phases count from it). */
  protected originNs = 0;
  /** EPOCH mode's value as the two 32-bit words a write stores. */
  readonly epochLo: number;
  readonly epochHi: number;

  constructor(
    readonly spec: WorkloadSpec,
    totalPages: number,
    seed: bigint,
    vcpuIndex: number,
    vcpuCount: number,
    /** A phase's generator draws from its workload's. */
    rng?: Rng,
  ) {
    this.rng = rng ?? new Rng(seed);
    this.first = spec.firstPage;
    this.size = spec.pages || totalPages - spec.firstPage;
    this.hotSize = Math.max(1, Math.floor(this.size * spec.hotFraction));
    this.seqPos = Math.floor((this.size * vcpuIndex) / Math.max(1, vcpuCount));
    this.epochLo = Number(spec.epoch & 0xffffffffn) | 0;
    this.epochHi = Number((spec.epoch >> 32n) & 0xffffffffn) | 0;
  }

  /** Whether a saved sequential position fits this workload. */
  protected positionOk(pos: number): boolean {
    return this.size === 0 || pos < this.size;
  }

  /** Where the workload begins: its phases count guest time from here. */
  start(nowNs: number): this {
    this.originNs = nowNs;
    return this;
  }

  /** The phases' generators, whose sequential positions migrate too (none but a phased workload's). */
  protected get phaseGens(): WorkloadGen[] {
    return [];
  }

  /** This generator's position at guest time nowNs (see STATE_VERSION's layout). */
  save(nowNs: number): Uint8Array {
    const queued = BATCH - this.cursor;
    const phases = this.phaseGens;
    const header = STATE_HEADER + 8 * phases.length;
    const out = new Uint8Array(header + 4 * queued);
    const dv = new DataView(out.buffer);
    dv.setUint8(0, STATE_VERSION);
    this.rng.save().forEach((w, i) => dv.setUint32(1 + 4 * i, w >>> 0, true));
    dv.setBigUint64(17, BigInt(this.seqPos), true);
    dv.setFloat64(25, nowNs - this.originNs, true);
    dv.setUint8(33, phases.length);
    phases.forEach((g, k) => dv.setBigUint64(STATE_HEADER + 8 * k, BigInt(g.seqPos), true));
    for (let i = 0; i < queued; i++) dv.setUint32(header + 4 * i, this.batch[this.cursor + i], true);
    return out;
  }

  /** Continues from a saved position at guest time nowNs; refuses one that does not fit this workload or this VM's pages. */
  restore(state: Uint8Array, what: string, nowNs: number): void {
    const bad = (why: string) => invalidArgument(`${what}: generator state ${why}`, "EINVAL");
    if (state.byteLength < STATE_HEADER) throw bad(`of ${state.byteLength} bytes is malformed`);
    const dv = new DataView(state.buffer, state.byteOffset, state.byteLength);
    if (dv.getUint8(0) !== STATE_VERSION) throw bad(`version ${dv.getUint8(0)} is not ${STATE_VERSION}`);
    const phases = this.phaseGens;
    if (dv.getUint8(33) !== phases.length) throw bad(`has ${dv.getUint8(33)} phases; the workload has ${phases.length}`);
    const header = STATE_HEADER + 8 * phases.length;
    if (state.byteLength < header || (state.byteLength - header) % 4 !== 0) throw bad(`of ${state.byteLength} bytes is malformed`);
    const queued = (state.byteLength - header) / 4;
    if (queued > BATCH) throw bad(`queues ${queued} pages, more than a batch (${BATCH})`);
    const seqPos = Number(dv.getBigUint64(17, true));
    if (!this.positionOk(seqPos)) throw bad(`position ${seqPos} is past the working set (${this.size} pages)`);
    const elapsed = dv.getFloat64(25, true);
    if (!(elapsed >= 0 && Number.isFinite(elapsed))) throw bad(`elapsed time ${elapsed} is out of range`);
    const phasePos = phases.map((g, k) => {
      const pos = Number(dv.getBigUint64(STATE_HEADER + 8 * k, true));
      if (g.size > 0 && pos >= g.size) throw bad(`phase ${k}'s position ${pos} is past its working set (${g.size} pages)`);
      return pos;
    });
    const cursor = BATCH - queued;
    for (let i = 0; i < queued; i++) {
      const page = dv.getUint32(header + 4 * i, true);
      if (page < this.first || page >= this.first + this.size) throw bad(`queues page ${page}, outside the working set [${this.first}, ${this.first + this.size})`);
      this.batch[cursor + i] = page;
    }
    this.rng.restore([1, 5, 9, 13].map((o) => dv.getUint32(o, true)));
    this.seqPos = seqPos;
    phases.forEach((g, k) => (g.seqPos = phasePos[k]));
    this.originNs = nowNs - elapsed;
    this.cursor = cursor;
  }

  /** When refill() returns BATCH (no pages), the guest time until which the vCPU has nothing to write (a trace's quiet stretch). */
  idleUntilNs = 0;

  /** The current demanded writes per second (a phased workload's changes at its refills). */
  get writesPerSecond(): number {
    return this.spec.writesPerSecond;
  }

  /** The most writes per second it ever demands (what bounds a sync's guest work). */
  get peakWritesPerSecond(): number {
    return Math.max(this.spec.writesPerSecond, ...this.spec.phases.map((p) => p.spec.writesPerSecond));
  }

  get active(): boolean {
    return this.spec.pattern !== "idle" && this.spec.writesPerSecond > 0 && this.size > 0;
  }

  /** Fills the batch from the pattern; returns the new cursor (where the fresh pages begin). tNs is the guest time now. */
  refill(_tNs: number): number {
    this.fill(this.batch, 0);
    return (this.cursor = 0);
  }

  /** Writes the pattern's next pages into out[from, BATCH). */
  fill(out: Uint32Array, from: number): void {
    const rng = this.rng;
    const first = this.first;
    const size = this.size;
    switch (this.spec.pattern) {
      case "uniform":
        for (let i = from; i < BATCH; i++) out[i] = first + rng.below(size);
        break;
      case "hot-cold": {
        const hot = this.hotSize;
        const cold = size - hot;
        const pHot = cold > 0 ? this.spec.hotWriteFraction : 1;
        for (let i = from; i < BATCH; i++) {
          out[i] = rng.nextFloat() < pHot ? first + rng.below(hot) : first + hot + rng.below(cold);
        }
        break;
      }
      case "sequential": {
        let pos = this.seqPos;
        for (let i = from; i < BATCH; i++) {
          out[i] = first + pos;
          if (++pos === size) pos = 0;
        }
        this.seqPos = pos;
        break;
      }
      case "idle":
        out.fill(first, from);
        break;
    }
  }
}

/**
 * The key-value store's generator: the Zipf ranks (zipf.ts) scattered over
 * the working set. A class of its own rather than a case of refill(): a
 * larger refill cost the other patterns' write loop 15% in the bench.
 */
class ZipfGen extends WorkloadGen {
  private readonly zipf: ZipfSampler;

  constructor(spec: WorkloadSpec, totalPages: number, seed: bigint, vcpuIndex: number, vcpuCount: number, rng?: Rng) {
    super(spec, totalPages, seed, vcpuIndex, vcpuCount, rng);
    this.zipf = new ZipfSampler(Math.max(1, this.size), spec.zipfSkew);
  }

  override fill(out: Uint32Array, from: number): void {
    this.zipf.fill(out, from, this.rng, this.first);
  }
}

/**
 * A workload that changes with guest time: each phase its pattern and rate
 * for its duration, the phases repeated (a database's checkpoint every N
 * seconds) or run once to a last phase that lasts for ever (a training job's
 * streaming load, then its hot loop). A batch never runs past its phase's
 * end at the phase's rate, so a phase starts within one write of its time
 * when the guest keeps up.
 */
class PhasedGen extends WorkloadGen {
  private readonly gens: WorkloadGen[];
  private readonly ends: number[];
  private readonly cycleNs: number;
  private rate: number;

  constructor(spec: WorkloadSpec, totalPages: number, seed: bigint, vcpuIndex: number, vcpuCount: number) {
    super(spec, totalPages, seed, vcpuIndex, vcpuCount);
    this.gens = spec.phases.map((p) => workloadGen(p.spec, totalPages, seed, vcpuIndex, vcpuCount, this.rng));
    let end = 0;
    this.ends = spec.phases.map((p) => (end += p.durationNs || Infinity));
    this.cycleNs = end;
    this.rate = spec.phases[0].spec.writesPerSecond;
  }

  protected override get phaseGens(): WorkloadGen[] {
    return this.gens;
  }

  override get active(): boolean {
    return this.size > 0;
  }

  override get writesPerSecond(): number {
    return this.rate;
  }

  override refill(tNs: number): number {
    const at = this.cycleNs === Infinity ? tNs - this.originNs : (tNs - this.originNs) % this.cycleNs;
    let k = 0;
    while (at >= this.ends[k]) k++;
    this.rate = this.spec.phases[k].spec.writesPerSecond;
    const left = Math.ceil(((this.ends[k] - at) * this.rate) / 1e9);
    const n = Math.max(1, Math.min(BATCH, left));
    this.gens[k].fill(this.batch, BATCH - n);
    return (this.cursor = BATCH - n);
  }
}

/** Pages per batch of a trace: the spacing is re-aimed at the interval's end this often, so faults do not push writes into the next interval. */
const TRACE_BATCH = 64;
const TRACE_AIM = 0.9;

/**
 * A recorded trace replayed: interval k's pages are written once each,
 * evenly over [origin + k I, origin + (k + 1) I), and the trace loops. A
 * vCPU with nothing left in an interval idles to the next one's start. The
 * position in the trace (loops, interval, page) is the saved sequential
 * position, so it migrates as the other patterns' does.
 */
class TraceGen extends WorkloadGen {
  private readonly trace: Trace;
  private readonly intervals: number;
  private readonly total: number;
  private rate = 0;

  constructor(spec: WorkloadSpec, totalPages: number, seed: bigint, vcpuIndex: number, vcpuCount: number) {
    super(spec, totalPages, seed, vcpuIndex, vcpuCount);
    this.trace = spec.trace!;
    this.intervals = this.trace.offsets.length - 1;
    this.total = this.trace.pages.length;
    this.seqPos = 0;
  }

  override get active(): boolean {
    return this.total > 0;
  }

  /** The position counts pages replayed, loops included. */
  protected override positionOk(pos: number): boolean {
    return Number.isSafeInteger(pos);
  }

  override get writesPerSecond(): number {
    return this.rate;
  }

  override get peakWritesPerSecond(): number {
    let most = 0;
    const o = this.trace.offsets;
    for (let k = 0; k < this.intervals; k++) most = Math.max(most, o[k + 1] - o[k]);
    return (most * 1e9) / this.trace.intervalNs;
  }

  override refill(tNs: number): number {
    const { offsets, intervalNs, pages } = this.trace;
    const loop = Math.floor(this.seqPos / this.total);
    let at = this.seqPos - loop * this.total;
    // The interval holding position `at`: the k with offsets[k] <= at < offsets[k + 1] (empty intervals hold none).
    let lo = 0;
    let hi = this.intervals - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >>> 1;
      if (offsets[mid] <= at) lo = mid;
      else hi = mid - 1;
    }
    const k = lo;
    const start = this.originNs + (loop * this.intervals + k) * intervalNs;
    if (tNs < start) {
      this.idleUntilNs = start;
      return (this.cursor = BATCH);
    }
    const left = offsets[k + 1] - at;
    const n = Math.min(TRACE_BATCH, left);
    // Aimed at 90% of what is left of the interval: the slack absorbs what the writes cost the vCPU (faults), so none spills into the next one.
    const spacing = (TRACE_AIM * Math.max(0, start + intervalNs - tNs)) / left;
    this.rate = spacing > 0 ? 1e9 / spacing : Infinity;
    this.batch.set(pages.subarray(at, at + n), BATCH - n);
    at += n;
    this.seqPos = loop * this.total + at;
    return (this.cursor = BATCH - n);
  }
}

/** The generator for spec: each pattern's stream of pages. */
export function workloadGen(spec: WorkloadSpec, totalPages: number, seed: bigint, vcpuIndex: number, vcpuCount: number, rng?: Rng): WorkloadGen {
  if (spec.pattern === "phased") return new PhasedGen(spec, totalPages, seed, vcpuIndex, vcpuCount);
  if (spec.pattern === "trace") return new TraceGen(spec, totalPages, seed, vcpuIndex, vcpuCount);
  return spec.pattern === "zipf" ? new ZipfGen(spec, totalPages, seed, vcpuIndex, vcpuCount, rng) : new WorkloadGen(spec, totalPages, seed, vcpuIndex, vcpuCount, rng);
}
