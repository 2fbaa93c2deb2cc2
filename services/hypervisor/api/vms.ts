/** VMs, vCPUs, memslots, capabilities, the guest running (AdvanceVm, GuestWrite), stage-2 lookups and fault injection. */
import { setImmediate as yieldToEventLoop } from "node:timers/promises";
import { DomainError, failedPrecondition, invalidArgument, permissionDenied } from "../../../common/errors.js";
import { Capability, ClockDrive, ExitReason } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { AF, outputAddressOf } from "../model/descriptor.js";
import { checkNotMeasuring } from "../model/dirty-rate.js";
import { resumeSnapshotBytes, takeResumeSnapshot } from "../model/guest-memory.js";
import { DEFAULT_PERIOD_MS } from "../model/dirty-limit.js";
import { Level } from "../model/stage2.js";
import type { Vm } from "../model/vm.js";
import { ARCH, asBuffer, BACKING, exitsOf, FAULT_OUT, num, vcpuList, vmInfo, workloadFromProto, workloadToProto } from "./convert.js";
import type { ApiContext, Handlers } from "./context.js";

/** Longest single AdvanceVm: an hour of guest time. */
const MAX_ADVANCE_NS = 3600e9;
/**
 * Wall time one slice of guest work may hold the event loop (AdvanceVm, the
 * real-time drive); other calls run between slices.
 */
export const SLICE_MS = 10;

const stepped = (vm: Vm, what: string) => {
  if (vm.config.clock !== "stepped") throw failedPrecondition(`${what}: VM ${vm.name}'s clock is driven in real time`);
};

export function vmHandlers(ctx: ApiContext): Pick<Handlers, "createVm" | "getVm" | "listVms" | "destroyVm" | "pauseVm" | "resumeVm" | "setCpuThrottle" | "setVcpuDirtyLimit" | "queryVcpuDirtyLimit" | "setUserMemoryRegion" | "checkExtension" | "enableCap" | "setWorkload" | "advanceVm" | "getVcpuState" | "setVcpuState" | "guestWrite" | "translateGpa" | "unmapGpaRange" | "setFaultInjection"> {
  const { hv, metrics } = ctx;
  return {
    createVm(req) {
      if (req.clock !== ClockDrive.CLOCK_DRIVE_UNSPECIFIED && req.clock !== ClockDrive.CLOCK_DRIVE_STEPPED && req.clock !== ClockDrive.CLOCK_DRIVE_REALTIME) {
        throw invalidArgument(`unknown clock drive ${req.clock}`);
      }
      const backing = BACKING[req.backingPageSize];
      if (!backing) throw invalidArgument(`unknown backing page size ${req.backingPageSize}`);
      const arch = ARCH[req.arch];
      if (!arch) throw invalidArgument(`unknown architecture ${req.arch}`);
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
        arch,
        pml: req.pml,
        eagerPageSplit: req.eagerPageSplit,
      });
      return { vm: vmInfo(vm) };
    },
    getVm: (req) => ({ vm: vmInfo(hv.vm(req.vm)) }),
    listVms: () => ({ vms: [...hv.vms.values()].map(vmInfo) }),
    async destroyVm(req) {
      await hv.destroyVm(req.vm);
      ctx.lastGet.forget(req.vm);
      metrics.forgetVm(req.vm);
      return {};
    },
    pauseVm(req) {
      const vm = hv.vm(req.vm);
      vm.pause(vcpuList(vm, req.vcpus, "pause"));
      return { vm: vmInfo(vm) };
    },
    async resumeVm(req) {
      const vm = hv.vm(req.vm);
      const vcpus = vcpuList(vm, req.vcpus, "resume");
      const at = vm.clockNs;
      if (req.snapshot) {
        vm.resumeSnapshot = null; // a new snapshot replaces the old one
        hv.checkBudget(resumeSnapshotBytes(vm), `the resume snapshot of VM '${vm.name}'`);
        await takeResumeSnapshot(vm, yieldToEventLoop);
      }
      // At the guest time of the request: the real-time clock moved while the snapshot was copied, the guest did not.
      vm.resume(vcpus, at);
      return { vm: vmInfo(vm) };
    },
    setCpuThrottle(req) {
      const vm = hv.vm(req.vm);
      vm.setCpuThrottle(vcpuList(vm, req.vcpus, "set cpu throttle"), req.percentage);
      return { vm: vmInfo(vm) };
    },
    setVcpuDirtyLimit(req) {
      const vm = hv.vm(req.vm);
      vm.setVcpuDirtyLimit(vcpuList(vm, req.vcpus, "set vcpu dirty limit"), num(req.dirtyRateMbps, "dirty_rate_mbps"), req.periodMs || DEFAULT_PERIOD_MS);
      return { vm: vmInfo(vm) };
    },
    queryVcpuDirtyLimit(req) {
      const vm = hv.vm(req.vm);
      const l = vm.dirtyLimiter;
      if (!l) return { limits: [], throttleTimePerRoundUs: 0n, ringFullTimeUs: 0n, periodMs: 0 };
      return {
        limits: vm.vcpus.flatMap((v) =>
          v.dirtyLimit ? [{ cpuIndex: v.index, limitRate: BigInt(v.dirtyLimit.quotaMBps), currentRate: BigInt(v.dirtyLimit.currentMBps), throttleUsPerFull: BigInt(v.dirtyLimit.throttleUsPerFull) }] : [],
        ),
        throttleTimePerRoundUs: BigInt(l.throttleTimePerRoundUs(vm.vcpus)),
        ringFullTimeUs: BigInt(l.ringFullTimeAtMeanUs(vm.vcpus)),
        periodMs: l.periodMs,
      };
    },
    setUserMemoryRegion(req) {
      const vm = hv.vm(req.vm);
      checkNotMeasuring(vm, "SET_USER_MEMORY_REGION");
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
    setWorkload(req) {
      const vm = hv.vm(req.vm);
      if (!req.workload) throw invalidArgument("set workload: workload is missing");
      if (req.vcpu !== undefined) vm.vcpu(req.vcpu, "set workload");
      const spec = workloadFromProto(req.workload);
      hv.validateWorkload(vm, spec);
      hv.checkTraces(vm, req.vcpu, spec);
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
      const pageRequests = BigInt((vm.postcopy ?? vm.postcopyDone)?.requests.length ?? 0);
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
          pmlFullExits: BigInt(v.step.pmlFullExits),
        };
      });
      return { clockNs: BigInt(Math.round(vm.clockNs)), vcpus, writes: BigInt(writes), writeFaults: BigInt(faults), pageRequests };
    },
    getVcpuState(req) {
      const st = hv.vm(req.vm).saveVcpuState();
      return {
        vcpus: st.vcpus.map((v, index) => ({ index, workload: workloadToProto(v.workload, true), generator: asBuffer(v.generator) })),
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
          exit: r.mmio ? ExitReason.EXIT_REASON_MMIO : r.ringFull ? ExitReason.EXIT_REASON_DIRTY_RING_FULL : ExitReason.EXIT_REASON_UNSPECIFIED,
          costNs: BigInt(Math.round(r.costNs)),
          performed: r.performed,
        })),
        clockNs: BigInt(Math.round(vm.clockNs)),
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
        return { ...base, mapped: false, level: 0, descriptor: 0n, readable: false, writable: false, accessFlag: false, dbm: false, outputAddress: 0n, accessed: false, dirty: false };
      }
      const [pl, i] = slot.s2.leafRef(p, level);
      const lo = pl.lo[i];
      const hi = pl.hi[i];
      return { ...base, mapped: true, level, ...vm.arch.view(lo, hi, level, vm), accessFlag: (lo & AF) !== 0, outputAddress: BigInt(outputAddressOf(lo, hi)) };
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
        skipHwLogDrain: req.skipHwLogDrain,
        skipRingEntryAtWrap: req.skipRingEntryAtWrap,
        failEveryOtherGetCopy: req.failEveryOtherGetCopy,
        skipDeviceSyncWait: req.skipDeviceSyncWait,
      });
      return {};
    },
  };
}
