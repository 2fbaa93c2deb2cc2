/**
 * The hypervisor's gRPC API over the model: converts messages to model calls
 * and back. All validation errors come from the model as domain errors; the
 * binding in common/grpc.ts turns them into statuses.
 */
import { setImmediate as yieldToEventLoop } from "node:timers/promises";
import type { Registry } from "prom-client";
import { GrpcClientMetrics } from "../../common/client.js";
import { createComponentServer, type ComponentServer } from "../../common/component.js";
import { addService, MAX_MESSAGE_BYTES, type ServiceHandlers } from "../../common/grpc.js";
import { DomainError, invalidArgument, permissionDenied, failedPrecondition, resourceExhausted } from "../../common/errors.js";
import { INSECURE, type Security } from "../../common/security.js";
import type { Logger } from "../../common/log.js";
import {
  BackingPageSize,
  Capability,
  ClockDrive,
  ExitReason,
  FaultKind,
  HypervisorServiceService,
  LogTarget as ProtoLogTarget,
  WorkloadPattern,
  WriteValue,
  type VmInfo,
  type Workload,
} from "../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { DeviceRegistry } from "./device-registry.js";
import { HypervisorMetrics } from "./metrics.js";
import { RealtimeDriver } from "./model/clock.js";
import { toU64, outputAddressOf, AF, HI_DBM, S2AP_R, S2AP_W } from "./model/descriptor.js";
import { DEFAULT_CHUNK_PAGES, digest, readMemory, writeMemory } from "./model/guest-memory.js";
import type { Hypervisor } from "./model/hypervisor.js";
import { Level } from "./model/stage2.js";
import { Hdbss } from "./model/hdbss.js";
import type { StepStats } from "./model/vcpu.js";
import type { Vm, BackingPageSize as Backing, LogTarget } from "./model/vm.js";
import type { Pattern, WorkloadSpec } from "./model/workload.js";

export const HYPERVISOR_PROTO = "dirtytrack/hypervisor/v1/hypervisor.proto";
export const HYPERVISOR_SERVICE = "dirtytrack.hypervisor.v1.HypervisorService";

/** Longest single AdvanceVm: an hour of guest time. */
const MAX_ADVANCE_NS = 3600e9;
/**
 * Wall time one slice of guest work may hold the event loop (AdvanceVm, the
 * real-time drive); other calls run between slices.
 */
export const SLICE_MS = 10;


/** A uint64 from the wire as a JS number, refusing values past 2^53. */
function num(v: bigint, what: string): number {
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw invalidArgument(`${what} ${v} is too large`);
  return Number(v);
}

const asBuffer = (a: ArrayBufferView) => Buffer.from(a.buffer, a.byteOffset, a.byteLength);

const BACKING: Record<number, Backing> = {
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
};
const PATTERN_OUT: Record<Pattern, WorkloadPattern> = {
  idle: WorkloadPattern.WORKLOAD_PATTERN_IDLE,
  uniform: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM,
  "hot-cold": WorkloadPattern.WORKLOAD_PATTERN_HOT_COLD,
  sequential: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL,
};

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
    value: w.value === WriteValue.WRITE_VALUE_EPOCH ? "epoch" : "sequence",
    epoch: w.epoch,
    seed: w.seed,
  };
}

function workloadToProto(s: WorkloadSpec): Workload {
  return {
    pattern: PATTERN_OUT[s.pattern],
    writesPerSecond: s.writesPerSecond,
    workingSetFirstPage: BigInt(s.firstPage),
    workingSetPages: BigInt(s.pages),
    hotFraction: s.hotFraction,
    hotWriteFraction: s.hotWriteFraction,
    value: s.value === "epoch" ? WriteValue.WRITE_VALUE_EPOCH : WriteValue.WRITE_VALUE_SEQUENCE,
    epoch: s.epoch,
    seed: s.seed,
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
      hdbssEntries: vm.hw instanceof Hdbss ? vm.hw.index[v.index] : 0,
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
  };
}

const FAULT_OUT = {
  none: FaultKind.FAULT_KIND_UNSPECIFIED,
  translation: FaultKind.FAULT_KIND_TRANSLATION,
  permission: FaultKind.FAULT_KIND_PERMISSION,
  tracked: FaultKind.FAULT_KIND_TRACKED,
};
const LOG_TARGET_OUT: Record<LogTarget, ProtoLogTarget> = {
  none: ProtoLogTarget.LOG_TARGET_UNSPECIFIED,
  bitmap: ProtoLogTarget.LOG_TARGET_BITMAP,
  "backup-bitmap": ProtoLogTarget.LOG_TARGET_BACKUP_BITMAP,
  ring: ProtoLogTarget.LOG_TARGET_RING,
};

function exitsOf(s: StepStats) {
  const out = [];
  if (s.mmioExits) out.push({ reason: ExitReason.EXIT_REASON_MMIO, count: BigInt(s.mmioExits) });
  if (s.ringFullExits) out.push({ reason: ExitReason.EXIT_REASON_DIRTY_RING_FULL, count: BigInt(s.ringFullExits) });
  return out;
}

function vcpuList(vm: Vm, list: number[], what: string): number[] {
  if (list.length === 0) return vm.vcpus.map((v) => v.index);
  for (const i of list) vm.vcpu(i, what);
  return list;
}

/** The guest time of each slot's previous GET, for the dirty rate QEMU computes at every sync. */
class SyncClock {
  private readonly last = new Map<string, number>();
  forget(vm: string): void {
    for (const k of this.last.keys()) if (k.startsWith(`${vm}/`)) this.last.delete(k);
  }
  rate(vm: Vm, slot: number, dirtyPages: number): number | null {
    const key = `${vm.name}/${slot}`;
    const prev = this.last.get(key);
    this.last.set(key, vm.clockNs);
    return prev !== undefined && vm.clockNs > prev ? (dirtyPages * 1e9) / (vm.clockNs - prev) : null;
  }
}

export function hypervisorHandlers(
  hv: Hypervisor,
  metrics: HypervisorMetrics,
  devices: DeviceRegistry,
  limits: { maxMessageBytes: number },
): ServiceHandlers<typeof HypervisorServiceService> {
  const lastGet = new SyncClock();
  const stepped = (vm: Vm, what: string) => {
    if (vm.config.clock !== "stepped") throw failedPrecondition(`${what}: VM ${vm.name}'s clock is driven in real time`);
  };
  return {
    createVm(req) {
      if (req.clock !== ClockDrive.CLOCK_DRIVE_UNSPECIFIED && req.clock !== ClockDrive.CLOCK_DRIVE_STEPPED && req.clock !== ClockDrive.CLOCK_DRIVE_REALTIME) {
        throw invalidArgument(`unknown clock drive ${req.clock}`);
      }
      const backing = BACKING[req.backingPageSize];
      if (!backing) throw invalidArgument(`unknown backing page size ${req.backingPageSize}`);
      const vm = hv.createVm({
        name: req.vm,
        vcpus: req.vcpus,
        memslots: req.memslots.map((m) => ({
          slot: m.slot,
          gpa: num(m.guestPhysAddr, "guest_phys_addr"),
          size: num(m.memorySize, "memory_size"),
          flags: m.flags,
        })),
        backing,
        ipaBits: req.ipaBits,
        eagerSplitChunkSize: num(req.eagerSplitChunkSize, "eager_split_chunk_size"),
        clock: req.clock === ClockDrive.CLOCK_DRIVE_REALTIME ? "realtime" : "stepped",
        realtimeSpeed: req.realtimeSpeed,
        seed: req.seed,
        workload: req.workload ? workloadFromProto(req.workload) : null,
        startPaused: req.startPaused,
        tlbEntries: req.tlbEntries,
        dirtyRing: req.dirtyRing
          ? { capability: req.dirtyRing.capability, bytes: req.dirtyRing.bytes, withBitmap: req.dirtyRing.withBitmap }
          : null,
      });
      return { vm: vmInfo(vm) };
    },
    getVm: (req) => ({ vm: vmInfo(hv.vm(req.vm)) }),
    listVms: () => ({ vms: [...hv.vms.values()].map(vmInfo) }),
    async destroyVm(req) {
      await hv.destroyVm(req.vm);
      lastGet.forget(req.vm);
      metrics.forgetVm(req.vm);
      return {};
    },
    pauseVm(req) {
      const vm = hv.vm(req.vm);
      vm.pause(vcpuList(vm, req.vcpus, "pause"));
      return { vm: vmInfo(vm) };
    },
    resumeVm(req) {
      const vm = hv.vm(req.vm);
      vm.resume(vcpuList(vm, req.vcpus, "resume"));
      return { vm: vmInfo(vm) };
    },
    setUserMemoryRegion(req) {
      const vm = hv.vm(req.vm);
      if (!req.memslot) throw invalidArgument("SET_USER_MEMORY_REGION: memslot is missing");
      const m = req.memslot;
      const hostNs = hv.setUserMemoryRegion(vm, {
        slot: m.slot,
        gpa: num(m.guestPhysAddr, "guest_phys_addr"),
        size: num(m.memorySize, "memory_size"),
        flags: m.flags,
      });
      return { hostNs: BigInt(Math.round(hostNs)), vm: vmInfo(vm) };
    },
    checkExtension(req) {
      if (req.capability === 0) throw invalidArgument("CHECK_EXTENSION: capability is unspecified");
      const vm = req.vm ? hv.vm(req.vm) : null;
      return { value: BigInt(hv.checkExtension(vm, req.capability)) };
    },
    async enableCap(req) {
      if (req.capability === 0) throw invalidArgument("ENABLE_CAP: capability is unspecified");
      const vm = hv.vm(req.vm);
      // The device's capability talks to the device, so it is the one that waits.
      if (req.capability === Capability.CAPABILITY_ARM_PAGE_TRACKING_DEVICE) await hv.setPageTracking(vm, req.flags, req.args);
      else hv.enableCap(vm, req.capability, req.flags, req.args);
      return {};
    },
    async getDirtyLog(req) {
      const vm = hv.vm(req.vm);
      const slot = vm.slots.get(req.slot);
      // Refused before anything is synced or cleared: a bitmap that cannot be sent must not be lost.
      if (slot && slot.bitmapBytes + 1024 > limits.maxMessageBytes) {
        throw resourceExhausted(
          `GET_DIRTY_LOG: slot ${req.slot}'s bitmap is ${slot.bitmapBytes} bytes, over the ${limits.maxMessageBytes}-byte message limit; ` +
            "split the memory into smaller slots (at most 2 TiB each), or use manual protect and CLEAR_DIRTY_LOG by range",
          "E2BIG",
        );
      }
      const r = await hv.getDirtyLog(vm, req.slot);
      for (const [iface, ns] of Object.entries(r.costs)) metrics.syncHostSeconds.observe({ vm: vm.name, interface: iface }, ns / 1e9);
      const rate = lastGet.rate(vm, req.slot, r.dirtyPages);
      if (rate !== null) metrics.setSyncDirtyRate(vm.name, req.slot, vm.mechanism, rate);
      return {
        bitmap: asBuffer(r.bitmap),
        numPages: BigInt(r.numPages),
        dirtyPages: BigInt(r.dirtyPages),
        pagesWriteProtected: BigInt(r.pagesWriteProtected),
        tlbFlushed: r.tlbFlushed,
        hostNs: BigInt(Math.round(r.hostNs)),
        pagesSynced: BigInt(r.pagesSynced),
      };
    },
    async clearDirtyLog(req) {
      const vm = hv.vm(req.vm);
      const r = await hv.clearDirtyLog(vm, req.slot, num(req.firstPage, "first_page"), req.numPages, req.bitmap);
      metrics.syncHostSeconds.observe({ vm: vm.name, interface: "clear" }, r.hostNs / 1e9);
      return { pagesCleared: BigInt(r.pagesCleared), tlbFlushed: r.tlbFlushed, hostNs: BigInt(Math.round(r.hostNs)) };
    },
    setWorkload(req) {
      const vm = hv.vm(req.vm);
      if (!req.workload) throw invalidArgument("set workload: workload is missing");
      if (req.vcpu !== undefined) vm.vcpu(req.vcpu, "set workload");
      const spec = workloadFromProto(req.workload);
      hv.validateWorkload(vm, spec);
      vm.setWorkload(req.vcpu, spec);
      return { vm: vmInfo(vm) };
    },
    async advanceVm(req, ctx) {
      const vm = hv.vm(req.vm);
      stepped(vm, "advance");
      const d = num(req.durationNs, "duration_ns");
      if (d === 0 || d > MAX_ADVANCE_NS) throw invalidArgument(`advance: duration_ns ${d} must be in (0, ${MAX_ADVANCE_NS}] (one hour)`);
      await hv.advance(vm, d, SLICE_MS, async () => {
        await yieldToEventLoop();
        if (ctx.signal.aborted) {
          throw new DomainError("aborted", `advance: the call was cancelled or its deadline passed; VM ${vm.name} stopped at ${(vm.clockNs / 1e9).toFixed(6)} s of guest time`);
        }
      });
      let writes = 0;
      let faults = 0;
      const vcpus = vm.vcpus.map((v) => {
        writes += v.step.writes;
        faults += v.step.writeFaults;
        return {
          vcpu: v.index,
          writes: BigInt(v.step.writes),
          writeFaults: BigInt(v.step.writeFaults),
          trackingOverheadNs: BigInt(Math.round(v.step.overheadNs)),
          achievedWritesPerSecond: v.achievedWritesPerSecond,
          exits: exitsOf(v.step),
          dirtyRingStallNs: BigInt(Math.round(v.step.ringStallNs)),
          hdbssFullFaults: BigInt(v.step.hdbssFullFaults),
        };
      });
      return { clockNs: BigInt(Math.round(vm.clockNs)), vcpus, writes: BigInt(writes), writeFaults: BigInt(faults) };
    },
    getVcpuState(req) {
      const st = hv.vm(req.vm).saveVcpuState();
      return {
        vcpus: st.vcpus.map((v, index) => ({ index, workload: workloadToProto(v.workload), generator: asBuffer(v.generator) })),
        writeSequence: BigInt(st.writeSequence),
      };
    },
    setVcpuState(req) {
      const vm = hv.vm(req.vm);
      const vcpus = req.vcpus.map((v) => {
        if (!v.workload) throw invalidArgument(`set vcpu state: vCPU ${v.index} has no workload`);
        const spec = workloadFromProto(v.workload);
        hv.validateWorkload(vm, spec);
        return { index: v.index, workload: spec, generator: v.generator };
      });
      vm.restoreVcpuState(vcpus, num(req.writeSequence, "write_sequence"));
      return {};
    },
    guestWrite(req) {
      const vm = hv.vm(req.vm);
      const done = hv.guestWrites(vm, req.writes.map((w) => ({ vcpu: w.vcpu, gpa: num(w.gpa, "gpa"), value: w.value })));
      return {
        results: done.map((r) => ({
          fault: FAULT_OUT[r.fault],
          logged: r.logged,
          exit: r.mmio ? ExitReason.EXIT_REASON_MMIO : ExitReason.EXIT_REASON_UNSPECIFIED,
          costNs: BigInt(Math.round(r.costNs)),
        })),
      };
    },
    translateGpa(req) {
      const vm = hv.vm(req.vm);
      const gpa = num(req.gpa, "gpa");
      const slot = vm.slotOfGpa(gpa);
      if (!slot) throw invalidArgument(`translate: GPA 0x${gpa.toString(16)} is outside every memslot of VM ${vm.name}`);
      const p = Math.floor((gpa - slot.gpa) / 4096);
      const gfn = slot.baseGfn + p;
      const level = slot.s2.leafLevel(p);
      const base = {
        slot: slot.id,
        content: slot.contentAt(p),
        tlbWritableVcpus: vm.vcpus.filter((v) => v.tlb.holds(gfn)).map((v) => v.index),
      };
      if (level === Level.Unmapped) {
        return { ...base, mapped: false, level: 0, descriptor: 0n, readable: false, writable: false, accessFlag: false, dbm: false, outputAddress: 0n };
      }
      const [pl, i] = slot.s2.leafRef(p, level);
      const lo = pl.lo[i];
      const hi = pl.hi[i];
      return {
        ...base,
        mapped: true,
        level,
        descriptor: toU64(lo, hi),
        readable: (lo & S2AP_R) !== 0,
        writable: (lo & S2AP_W) !== 0,
        accessFlag: (lo & AF) !== 0,
        dbm: (hi & HI_DBM) !== 0,
        outputAddress: BigInt(outputAddressOf(lo, hi)),
      };
    },
    async *readMemory(req) {
      const vm = hv.vm(req.vm);
      const chunks = readMemory(
        vm,
        req.slot,
        num(req.firstPage, "first_page"),
        num(req.numPages, "num_pages"),
        req.bitmap,
        req.chunkPages || DEFAULT_CHUNK_PAGES,
      );
      for (const c of chunks) {
        yield { chunk: { slot: c.slot, firstPage: BigInt(c.firstPage), numPages: c.numPages, bitmap: asBuffer(c.bitmap), contents: asBuffer(c.contents) } };
      }
    },
    async writeMemory(reqs) {
      let vm: Vm | null = null;
      let pages = 0;
      for await (const r of reqs) {
        if (!vm) vm = hv.vm(r.vm);
        else if (r.vm && r.vm !== vm.name) throw invalidArgument(`write memory: stream started on VM ${vm.name} and then named ${r.vm}`);
        if (!r.chunk) throw invalidArgument("write memory: a message has no chunk");
        pages += writeMemory(vm, {
          slot: r.chunk.slot,
          firstPage: num(r.chunk.firstPage, "first_page"),
          numPages: r.chunk.numPages,
          bitmap: r.chunk.bitmap,
          contents: r.chunk.contents,
        });
      }
      return { pagesWritten: BigInt(pages) };
    },
    async getMemoryDigest(req) {
      const d = await digest(hv.vm(req.vm), yieldToEventLoop);
      return { sha256: d.sha256, sha256Hex: d.sha256.toString("hex"), pages: BigInt(d.pages) };
    },
    harvestDirtyRing(req) {
      const r = hv.vm(req.vm).harvestRing(req.vcpu, req.maxEntries);
      metrics.ringHarvested.inc({ vm: req.vm }, r.count);
      return { entries: asBuffer(r.entries), count: r.count, hostNs: BigInt(Math.round(r.hostNs)) };
    },
    resetDirtyRings(req) {
      const vm = hv.vm(req.vm);
      const r = vm.resetRings();
      metrics.ringResetEntries.inc({ vm: vm.name }, r.cleared);
      metrics.syncHostSeconds.observe({ vm: vm.name, interface: "ring_reset" }, r.hostNs / 1e9);
      return { cleared: BigInt(r.cleared), tlbFlushed: r.tlbFlushed, hostNs: BigInt(Math.round(r.hostNs)) };
    },
    hostWrite(req) {
      const vm = hv.vm(req.vm);
      const targets = vm.hostWrite(req.writes.map((w) => ({ gpa: num(w.gpa, "gpa"), value: w.value })));
      return { logged: targets.map((t) => LOG_TARGET_OUT[t]) };
    },
    addWriteTracking(req) {
      return { count: hv.addWriteTracking(hv.vm(req.vm), num(req.gfn, "gfn")) };
    },
    removeWriteTracking(req) {
      return { count: hv.vm(req.vm).removeWriteTracking(num(req.gfn, "gfn")) };
    },
    async *watchWriteTracking(req, ctx) {
      const tracker = hv.vm(req.vm).writeTrack;
      const sub = tracker.subscribe();
      const onAbort = () => {
        if (tracker.subscribers.has(sub.id)) tracker.unsubscribe(sub.id);
      };
      ctx.signal.addEventListener("abort", onAbort, { once: true });
      try {
        let seq = 1;
        yield { seq: BigInt(seq++), subscriptionId: BigInt(sub.id) };
        for (;;) {
          await sub.wait();
          while (sub.queue.length) {
            const e = sub.queue.shift()!;
            yield e.kind === "write"
              ? {
                  seq: BigInt(seq++),
                  trackWrite: {
                    gpa: BigInt(e.gpa),
                    newValue: (BigInt(e.valueHi >>> 0) << 32n) | BigInt(e.valueLo >>> 0),
                    vcpu: e.vcpu,
                    timeNs: BigInt(Math.round(e.timeNs)),
                  },
                }
              : { seq: BigInt(seq++), trackRemoveRegion: { gfn: BigInt(e.gfn), nrPages: BigInt(e.nrPages) } };
          }
          if (sub.closed) {
            if (sub.closed.error) throw sub.closed.error;
            return;
          }
        }
      } finally {
        ctx.signal.removeEventListener("abort", onAbort);
        onAbort();
      }
    },
    unwatchWriteTracking(req) {
      hv.vm(req.vm).writeTrack.unsubscribe(num(req.subscriptionId, "subscription_id"));
      return {};
    },
    async registerPageTrackingDevice(req) {
      return { linkId: await devices.register(req.address) };
    },
    async unregisterPageTrackingDevice(req) {
      await devices.unregister(req.address);
      return {};
    },
    unmapGpaRange(req) {
      return { dirtySaved: BigInt(hv.vm(req.vm).unmapGpaRange(num(req.gpa, "gpa"), num(req.size, "size"))) };
    },
    setFaultInjection(req) {
      if (!hv.options.allowFaultInjection) {
        throw permissionDenied("fault injection is disabled on this hypervisor (start it with HYPERVISOR_ALLOW_FAULT_INJECTION=1)");
      }
      Object.assign(hv.vm(req.vm).injected, {
        skipTlbFlushAfterWriteProtect: req.skipTlbFlushAfterWriteProtect,
        skipHdbssFlush: req.skipHdbssFlush,
        skipRingEntryAtWrap: req.skipRingEntryAtWrap,
      });
      return {};
    },
  };
}

export interface HypervisorServerDeps {
  hypervisor: Hypervisor;
  logger: Logger;
  registry?: Registry;
  security?: Security;
  /** Real-time drive tick; 0 disables the driver (tests of stepped VMs). */
  realtimeTickMs?: number;
  /** The largest message this server sends (default MAX_MESSAGE_BYTES; tests lower it). */
  maxMessageBytes?: number;
}

export type HypervisorServer = ComponentServer;

export function createHypervisorServer(deps: HypervisorServerDeps): HypervisorServer {
  const driver = new RealtimeDriver(() => deps.hypervisor.vms.values(), deps.realtimeTickMs ?? 20, SLICE_MS);
  const security = deps.security ?? INSECURE;
  let devices: DeviceRegistry | undefined;
  const app = createComponentServer({
    registry: deps.registry,
    security,
    protoFiles: [HYPERVISOR_PROTO],
    serviceNames: [HYPERVISOR_SERVICE],
    health: () => ({ ok: true, detail: { vms: deps.hypervisor.vms.size } }),
    onListen: () => {
      if (deps.realtimeTickMs !== 0) driver.start();
    },
    onClose: async () => {
      driver.stop();
      if (devices?.link) await devices.unregister(devices.link.address).catch(() => undefined);
    },
  });
  const metrics = new HypervisorMetrics(app.registry, deps.hypervisor);
  const registered = new DeviceRegistry(deps.hypervisor, deps.logger, metrics, new GrpcClientMetrics(app.registry), security);
  devices = registered;
  deps.hypervisor.pageTracking = registered;
  metrics.watchDevice(() => registered.link);
  addService(app.grpc, HypervisorServiceService, hypervisorHandlers(deps.hypervisor, metrics, registered, { maxMessageBytes: deps.maxMessageBytes ?? MAX_MESSAGE_BYTES }), {
    metrics: app.rpcMetrics,
    logger: deps.logger,
  });
  return app;
}
