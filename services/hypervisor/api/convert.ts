/**
 * The hypervisor API's message conversions: wire values to model values and
 * back (uint64s, enums, workloads, VmInfo), with precise errors for values
 * the model cannot take.
 */
import { invalidArgument } from "../../../common/errors.js";
import {
  Arch as ProtoArch,
  BackingPageSize,
  ClockDrive,
  ExitReason,
  FaultKind,
  LogTarget as ProtoLogTarget,
  WorkloadPattern,
  WriteValue,
  type PostcopyInfo,
  type VmInfo,
  type Workload,
} from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { Hdbss } from "../model/hdbss.js";
import { Pml } from "../model/pml.js";
import type { StepStats } from "../model/vcpu.js";
import type { Arch, Vm, BackingPageSize as Backing, LogTarget } from "../model/vm.js";
import { MAX_PHASES, MAX_TRACE_PAGES, type Pattern, type Trace, type WorkloadPhase, type WorkloadSpec } from "../model/workload.js";

/** A uint64 from the wire as a JS number, refusing values past 2^53. */
export function num(v: bigint, what: string): number {
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw invalidArgument(`${what} ${v} is too large`);
  return Number(v);
}

export const asBuffer = (a: ArrayBufferView) => Buffer.from(a.buffer, a.byteOffset, a.byteLength);

export const BACKING: Record<number, Backing> = {
  [BackingPageSize.BACKING_PAGE_SIZE_UNSPECIFIED]: "4K",
  [BackingPageSize.BACKING_PAGE_SIZE_4K]: "4K",
  [BackingPageSize.BACKING_PAGE_SIZE_2M]: "2M",
  [BackingPageSize.BACKING_PAGE_SIZE_1G]: "1G",
};
const BACKING_OUT: Record<Backing, BackingPageSize> = {
  "4K": BackingPageSize.BACKING_PAGE_SIZE_4K,
  "2M": BackingPageSize.BACKING_PAGE_SIZE_2M,
  "1G": BackingPageSize.BACKING_PAGE_SIZE_1G,
};
const PATTERN: Record<number, Pattern> = {
  [WorkloadPattern.WORKLOAD_PATTERN_UNSPECIFIED]: "idle",
  [WorkloadPattern.WORKLOAD_PATTERN_IDLE]: "idle",
  [WorkloadPattern.WORKLOAD_PATTERN_UNIFORM]: "uniform",
  [WorkloadPattern.WORKLOAD_PATTERN_HOT_COLD]: "hot-cold",
  [WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL]: "sequential",
  [WorkloadPattern.WORKLOAD_PATTERN_ZIPF]: "zipf",
  [WorkloadPattern.WORKLOAD_PATTERN_PHASED]: "phased",
  [WorkloadPattern.WORKLOAD_PATTERN_TRACE]: "trace",
};
const PATTERN_OUT: Record<Pattern, WorkloadPattern> = {
  idle: WorkloadPattern.WORKLOAD_PATTERN_IDLE,
  uniform: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM,
  "hot-cold": WorkloadPattern.WORKLOAD_PATTERN_HOT_COLD,
  sequential: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL,
  zipf: WorkloadPattern.WORKLOAD_PATTERN_ZIPF,
  phased: WorkloadPattern.WORKLOAD_PATTERN_PHASED,
  trace: WorkloadPattern.WORKLOAD_PATTERN_TRACE,
};

/** A phased workload's phases: 1 to MAX_PHASES, none of them phased, durations > 0 but the last's, rates > 0. */
function phasesFromProto(w: Workload, pattern: Pattern): WorkloadPhase[] {
  if (pattern !== "phased") {
    if (w.phases.length) throw invalidArgument(`workload phases are for WORKLOAD_PATTERN_PHASED; this workload's pattern is ${pattern}`);
    return [];
  }
  if (w.phases.length === 0 || w.phases.length > MAX_PHASES) throw invalidArgument(`a phased workload has 1 to ${MAX_PHASES} phases, not ${w.phases.length}`);
  return w.phases.map((ph, k) => {
    const what = `workload phase ${k}`;
    if (!ph.workload) throw invalidArgument(`${what} has no workload`);
    if (ph.workload.pattern === WorkloadPattern.WORKLOAD_PATTERN_PHASED || ph.workload.phases.length) throw invalidArgument(`${what}: a phase cannot itself be phased`);
    const durationNs = num(ph.durationNs, `${what} duration_ns`);
    if (durationNs === 0 && k !== w.phases.length - 1) throw invalidArgument(`${what}: duration_ns 0 (for ever) is for the last phase only`);
    const spec = workloadFromProto(ph.workload);
    if (spec.pattern === "idle" || !(spec.writesPerSecond > 0)) throw invalidArgument(`${what}: a phase writes (a pattern other than idle, writes_per_second > 0); a quiet phase is a low rate`);
    return { durationNs, spec };
  });
}

/** A trace workload's pages, flattened: at least one page, at most MAX_TRACE_PAGES, an interval > 0, no reads. */
function traceFromProto(w: Workload, pattern: Pattern): Trace | null {
  if (pattern !== "trace") {
    if (w.trace) throw invalidArgument(`workload trace is for WORKLOAD_PATTERN_TRACE; this workload's pattern is ${pattern}`);
    return null;
  }
  const t = w.trace;
  if (!t) throw invalidArgument("a trace workload needs its trace");
  const intervalNs = num(t.intervalNs, "trace interval_ns");
  if (intervalNs === 0) throw invalidArgument("trace interval_ns must be > 0");
  if (t.intervals.length === 0) throw invalidArgument("the trace has no intervals");
  const total = t.intervals.reduce((n, i) => n + i.pages.length, 0);
  if (total === 0) throw invalidArgument("the trace has no pages in any interval");
  if (total > MAX_TRACE_PAGES) throw invalidArgument(`the trace has ${total} pages; at most ${MAX_TRACE_PAGES} per vCPU`);
  if (w.readsPerSecond > 0) throw invalidArgument("a trace replays writes only: reads_per_second must be 0");
  const pages = new Uint32Array(total);
  const offsets = new Uint32Array(t.intervals.length + 1);
  t.intervals.forEach((iv, k) => {
    pages.set(iv.pages, offsets[k]);
    offsets[k + 1] = offsets[k] + iv.pages.length;
  });
  return { intervalNs, pages, offsets };
}

function traceToProto(t: Trace | null, withPages: boolean): Workload["trace"] {
  if (!t) return undefined;
  if (!withPages) return { intervalNs: BigInt(t.intervalNs), intervals: [] };
  return { intervalNs: BigInt(t.intervalNs), intervals: Array.from({ length: t.offsets.length - 1 }, (_, k) => ({ pages: Array.from(t.pages.subarray(t.offsets[k], t.offsets[k + 1])) })) };
}

export function workloadFromProto(w: Workload): WorkloadSpec {
  const pattern = PATTERN[w.pattern];
  if (!pattern) throw invalidArgument(`unknown workload pattern ${w.pattern}`);
  if (w.value !== WriteValue.WRITE_VALUE_UNSPECIFIED && w.value !== WriteValue.WRITE_VALUE_SEQUENCE && w.value !== WriteValue.WRITE_VALUE_EPOCH) {
    throw invalidArgument(`unknown write value mode ${w.value}`);
  }
  return {
    pattern,
    writesPerSecond: w.writesPerSecond,
    firstPage: num(w.workingSetFirstPage, "working_set_first_page"),
    pages: num(w.workingSetPages, "working_set_pages"),
    hotFraction: w.hotFraction || 0.1,
    hotWriteFraction: w.hotWriteFraction || 0.9,
    zipfSkew: w.zipfSkew || 0.99,
    readsPerSecond: w.readsPerSecond,
    value: w.value === WriteValue.WRITE_VALUE_EPOCH ? "epoch" : "sequence",
    epoch: w.epoch,
    seed: w.seed,
    phases: phasesFromProto(w, pattern),
    trace: traceFromProto(w, pattern),
  };
}

/** The workload as the API shows it; a trace's pages only when asked (GetVcpuState), not in every VmInfo. */
export function workloadToProto(s: WorkloadSpec, withTrace = false): Workload {
  return {
    pattern: PATTERN_OUT[s.pattern],
    writesPerSecond: s.writesPerSecond,
    workingSetFirstPage: BigInt(s.firstPage),
    workingSetPages: BigInt(s.pages),
    hotFraction: s.hotFraction,
    hotWriteFraction: s.hotWriteFraction,
    zipfSkew: s.zipfSkew,
    readsPerSecond: s.readsPerSecond,
    value: s.value === "epoch" ? WriteValue.WRITE_VALUE_EPOCH : WriteValue.WRITE_VALUE_SEQUENCE,
    epoch: s.epoch,
    seed: s.seed,
    phases: s.phases.map((p) => ({ durationNs: BigInt(p.durationNs), workload: workloadToProto(p.spec) })),
    trace: traceToProto(s.trace, withTrace),
  };
}

export function vmInfo(vm: Vm): VmInfo {
  return {
    vm: vm.name,
    vmid: vm.config.vmid,
    clock: vm.config.clock === "realtime" ? ClockDrive.CLOCK_DRIVE_REALTIME : ClockDrive.CLOCK_DRIVE_STEPPED,
    realtimeSpeed: vm.config.realtimeSpeed,
    clockNs: BigInt(Math.round(vm.clockNs)),
    backingPageSize: BACKING_OUT[vm.config.backing],
    ipaBits: vm.config.ipaBits,
    eagerSplitChunkSize: BigInt(vm.eagerSplitChunk),
    manualDirtyLogProtect: vm.manualProtectFlags,
    vcpus: vm.vcpus.map((v) => ({
      index: v.index,
      paused: v.paused,
      workload: workloadToProto(vm.workloadOf(v.index)),
      writes: BigInt(v.total.writes),
      writeFaults: BigInt(v.total.writeFaults),
      trackingOverheadNs: BigInt(Math.round(v.total.overheadNs)),
      achievedWritesPerSecond: v.achievedWritesPerSecond,
      dirtyRingFullExits: BigInt(v.total.ringFullExits),
      dirtyRingStallNs: BigInt(Math.round(v.total.ringStallNs)),
      dirtyRingEntries: v.ring?.used ?? 0,
      hdbssFullFaults: BigInt(v.total.hdbssFullFaults),
      hdbssEntries: vm.hw instanceof Hdbss ? vm.hw.used[v.index] : 0,
      pmlFullExits: BigInt(v.total.pmlFullExits),
      pmlEntries: vm.hw instanceof Pml ? vm.hw.used[v.index] : 0,
      cpuThrottlePercentage: v.throttle?.percentage ?? 0,
      cpuThrottleNs: BigInt(Math.round(v.total.throttleNs)),
      dirtyLimitMbps: BigInt(v.dirtyLimit?.quotaMBps ?? 0),
      dirtyLimitSleepNs: BigInt(Math.round(v.total.dirtyLimitNs)),
      kicks: BigInt(v.total.kicks),
    })),
    memslots: vm.sortedSlots().map((s) => ({
      memslot: { slot: s.id, guestPhysAddr: BigInt(s.gpa), memorySize: BigInt(s.size), flags: s.flags },
      numPages: BigInt(s.npages),
      logging: s.logging,
      mappedPages4k: BigInt(s.s2.pages4k),
      mappedBlocks2m: BigInt(s.s2.blocks2m),
      mappedBlocks1g: BigInt(s.s2.blocks1g),
    })),
    memoryBytes: BigInt(vm.memoryBytes),
    tlbFlushes: BigInt(vm.tlbFlushes),
    tlbEntries: vm.config.tlbEntries,
    seed: vm.config.seed,
    dirtyRingBytes: BigInt(vm.config.ringBytes),
    dirtyRingSoftLimit: vm.vcpus[0]?.ring?.softLimit ?? 0,
    dirtyRingWithBitmap: vm.ringWithBitmap,
    writeTrackedPages: vm.writeTrack.trackedPages,
    writeTrackSubscribers: vm.writeTrack.subscribers.size,
    hardwareDirty: vm.hwDirty !== "off",
    pageTrackingDevice: vm.hwDirty === "device",
    hardwareDirtyUpdates: BigInt(vm.hwDirtyUpdates),
    hdbssBufferEntries: vm.hw instanceof Hdbss ? vm.hw.entries : 0,
    arch: ARCH_OUT[vm.config.arch],
    pml: vm.config.pml,
    eagerPageSplit: vm.config.eagerPageSplit,
    postcopy: postcopyInfo(vm),
  };
}

function postcopyInfo(vm: Vm): PostcopyInfo | undefined {
  const pc = vm.postcopy ?? vm.postcopyDone;
  if (!pc) return undefined;
  return {
    active: vm.postcopy !== null,
    unsentPages: BigInt(pc.unsent),
    requests: BigInt(pc.requests.length),
    duplicatePages: BigInt(pc.duplicates),
    blocktimeNs: BigInt(Math.round(pc.blocktimeNs)),
    vcpuBlocktimeNs: [...pc.vcpuBlocktimeNs].map((n) => BigInt(Math.round(n))),
    lastArrivalNs: BigInt(Math.round(pc.lastArrivalNs)),
  };
}

export const FAULT_OUT = {
  none: FaultKind.FAULT_KIND_UNSPECIFIED,
  translation: FaultKind.FAULT_KIND_TRANSLATION,
  permission: FaultKind.FAULT_KIND_PERMISSION,
  tracked: FaultKind.FAULT_KIND_TRACKED,
};
export const LOG_TARGET_OUT: Record<LogTarget, ProtoLogTarget> = {
  none: ProtoLogTarget.LOG_TARGET_UNSPECIFIED,
  bitmap: ProtoLogTarget.LOG_TARGET_BITMAP,
  "backup-bitmap": ProtoLogTarget.LOG_TARGET_BACKUP_BITMAP,
  ring: ProtoLogTarget.LOG_TARGET_RING,
};

export function exitsOf(s: StepStats) {
  const out = [];
  if (s.mmioExits) out.push({ reason: ExitReason.EXIT_REASON_MMIO, count: BigInt(s.mmioExits) });
  if (s.ringFullExits) out.push({ reason: ExitReason.EXIT_REASON_DIRTY_RING_FULL, count: BigInt(s.ringFullExits) });
  return out;
}

export function vcpuList(vm: Vm, list: number[], what: string): number[] {
  if (list.length === 0) return vm.vcpus.map((v) => v.index);
  for (const i of list) vm.vcpu(i, what);
  return list;
}

export const ARCH: Record<number, Arch> = {
  [ProtoArch.ARCH_UNSPECIFIED]: "arm64",
  [ProtoArch.ARCH_ARM64]: "arm64",
  [ProtoArch.ARCH_X86_64]: "x86_64",
};
const ARCH_OUT: Record<Arch, ProtoArch> = { arm64: ProtoArch.ARCH_ARM64, x86_64: ProtoArch.ARCH_X86_64 };
