/**
 * The guest workloads the demo and `compare` offer, and what each stands for.
 * The plain patterns are the hypervisor's; bursty and training are phased
 * workloads built from them (WORKLOAD_PATTERN_PHASED), which change with
 * guest time and migrate with the vCPU state.
 */
import { Workload, WorkloadPattern } from "../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";

export const WORKLOADS = {
  "hot-cold": "a working set: --hot-write-fraction of the writes to the first --hot-fraction of memory (a web or app server)",
  uniform: "writes spread evenly over memory (the worst case for convergence)",
  sequential: "a stream through memory, wrapping (a memory-bandwidth benchmark, a big copy)",
  zipf: "a key-value store: the page of rank k written with probability ~ 1/k^--zipf-skew, ranks scattered as a hash table's keys",
  bursty: "a database: hot-cold writes, and every --checkpoint-every a checkpoint that writes --checkpoint-fraction of memory at --checkpoint-rate",
  training: "a training job: streams through all memory at --stream-rate for --stream-for (loading data), then a hot-cold loop for ever",
  trace: "a recorded trace (--trace FILE, from `record`) replayed: each interval's pages written once each, in a loop",
  idle: "no writes",
} as const;
export type WorkloadName = keyof typeof WORKLOADS;

const PLAIN: Partial<Record<WorkloadName, WorkloadPattern>> = {
  "hot-cold": WorkloadPattern.WORKLOAD_PATTERN_HOT_COLD,
  uniform: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM,
  sequential: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL,
  zipf: WorkloadPattern.WORKLOAD_PATTERN_ZIPF,
  idle: WorkloadPattern.WORKLOAD_PATTERN_IDLE,
};

export interface WorkloadParams {
  writesPerSecond: number;
  hotFraction: number;
  hotWriteFraction: number;
  zipfSkew: number;
  checkpoint: { everyNs: number; forNs: number; writesPerSecond: number; fraction: number };
  stream: { forNs: number; writesPerSecond: number };
}

/** The Workload message for a named workload over a guest of totalPages pages. */
export function buildWorkload(name: WorkloadName, p: WorkloadParams, totalPages: number): Workload {
  const hotCold = Workload.fromPartial({ pattern: WorkloadPattern.WORKLOAD_PATTERN_HOT_COLD, writesPerSecond: p.writesPerSecond, hotFraction: p.hotFraction, hotWriteFraction: p.hotWriteFraction });
  const phased = (phases: { durationNs: number; workload: Workload }[]) =>
    Workload.fromPartial({ pattern: WorkloadPattern.WORKLOAD_PATTERN_PHASED, writesPerSecond: p.writesPerSecond, phases: phases.map((ph) => ({ durationNs: BigInt(Math.round(ph.durationNs)), workload: ph.workload })) });
  if (name === "bursty") {
    const c = p.checkpoint;
    // The checkpoint writes the pages past the hot set (the data files' cache), sequentially.
    const first = Math.min(totalPages - 1, Math.floor(totalPages * p.hotFraction));
    const pages = Math.max(1, Math.min(totalPages - first, Math.floor(totalPages * c.fraction)));
    const sweep = Workload.fromPartial({ pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: c.writesPerSecond, workingSetFirstPage: BigInt(first), workingSetPages: BigInt(pages) });
    return phased([
      { durationNs: c.everyNs - c.forNs, workload: hotCold },
      { durationNs: c.forNs, workload: sweep },
    ]);
  }
  if (name === "training") {
    const stream = Workload.fromPartial({ pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: p.stream.writesPerSecond });
    return phased([
      { durationNs: p.stream.forNs, workload: stream },
      { durationNs: 0, workload: hotCold },
    ]);
  }
  // A trace is per vCPU (trace/replay.ts); every vCPU gets its own, and this stays idle.
  return Workload.fromPartial({ pattern: PLAIN[name] ?? WorkloadPattern.WORKLOAD_PATTERN_IDLE, writesPerSecond: p.writesPerSecond, hotFraction: p.hotFraction, hotWriteFraction: p.hotWriteFraction, zipfSkew: p.zipfSkew });
}

/** The workload with vCPU 0's rate: every phase scaled as the base rate is. */
export function withRate(w: Workload, writesPerSecond: number): Workload {
  const scale = w.writesPerSecond > 0 ? writesPerSecond / w.writesPerSecond : 0;
  return { ...w, writesPerSecond, phases: w.phases.map((ph) => ({ ...ph, workload: ph.workload && { ...ph.workload, writesPerSecond: ph.workload.writesPerSecond * scale } })) };
}
