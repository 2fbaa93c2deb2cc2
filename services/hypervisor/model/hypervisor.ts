/**
 * The hypervisor: the set of VMs on this host, the host's memory budget, VMID
 * allocation, KVM_SET_USER_MEMORY_REGION's rules and the capabilities
 * (KVM_CHECK_EXTENSION / KVM_ENABLE_CAP). Validation here mirrors KVM's and
 * names KVM's errno.
 */
import { alreadyExists, DomainError, echo, failedPrecondition, invalidArgument, notFound, resourceExhausted } from "../../../common/errors.js";
import { formatBytes } from "../../../common/config.js";
import type { CostModel } from "./cost-model.js";
import { PAGE_SIZE } from "./descriptor.js";
import { checkRingBytes, DirtyRing, ENTRY_BYTES, MAX_ENTRIES } from "./dirty-ring.js";
import { BATCH, MAX_TRACE_PAGES } from "./workload.js";
import { KNOWN_FLAGS, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, MAX_SLOT_PAGES, Memslot, USER_MEM_SLOTS } from "./memslot.js";
import { INITIALLY_SET, MANUAL_PROTECT_ENABLE, Vm, type Arch, type BackingPageSize, type ClockDrive } from "./vm.js";
import { Pml } from "./pml.js";
import { CAP } from "./arch.js";
import { ARM64 } from "./arm64.js";
import { ARCHES, capOwner } from "./arches.js";
import * as bitmapLog from "./dirty-bitmap.js";
import { addWriteTracking, writeTrackerOf } from "./write-track.js";
import type { WorkloadSpec } from "./workload.js";
import type { PageTrackingDriver } from "./page-tracking-device.js";
import type { GetDirtyLogResult, ClearDirtyLogResult } from "./dirty-bitmap.js";

export { CAP } from "./arch.js";

export const MAX_VCPUS = 512;
export const DEFAULT_IPA_BITS = 40;
export const DEFAULT_TLB_ENTRIES = 1024;

export interface MemslotSpec {
  slot: number;
  gpa: number;
  size: number;
  flags: number;
}

export interface CreateVmSpec {
  name: string;
  vcpus: number;
  memslots: MemslotSpec[];
  backing: BackingPageSize;
  ipaBits: number;
  eagerSplitChunkSize: number;
  clock: ClockDrive;
  realtimeSpeed: number;
  seed: bigint;
  workload: WorkloadSpec | null;
  startPaused: boolean;
  tlbEntries: number;
  dirtyRing: { capability: number; bytes: bigint; withBitmap: boolean } | null;
  arch: Arch;
  /** x86_64 only: Intel PML on. */
  pml: boolean;
  /** x86_64 only: kvm's eager_page_split (undefined: the kernel's default, Y). */
  eagerPageSplit?: boolean;
}

export interface HypervisorOptions {
  /**
   * Bytes this hypervisor may allocate for all its VMs' state: per-page
   * contents and descriptors (about 16 per guest page), dirty logs, TLBs,
   * rings, write-tracking counts. Whatever would pass it is refused.
   */
  memoryBudgetBytes: number;
  costs: CostModel;
  /** Allows SetFaultInjection (test-only bug switches). */
  allowFaultInjection: boolean;
  /**
   * One of several VM workers of a process (shards.ts): its VMIDs are
   * first, first + stride, ... (unique in the process, as the device needs),
   * and the budget is shared with the others through the ledger.
   */
  shard?: { firstVmid: number; vmidStride: number; ledger: BudgetLedger };
}

/** The memory the other VM workers of the process hold, counted against one budget. */
export interface BudgetLedger {
  /** Runs fn with no other worker checking or publishing. */
  locked<T>(fn: () => T): T;
  /** Bytes the other workers published. */
  others(): number;
  /** This worker's bytes in use (or reserved). */
  publish(bytes: number): void;
}

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;

/** Host time a sync spent, by the interface that spent it (the names of hypervisor_dirty_log_sync_host_seconds). */
export type SyncCosts = Partial<Record<"get" | "clear" | "dbm_scan" | "device_read", number>>;

/**
 * Bytes of a VM's typed arrays as created (what createVm counts against the
 * budget): its slots as flagged, and per vCPU the TLB, the ring and the batch.
 */
export function vmStateBytes(v: {
  vcpus: number;
  memslots: { gpa: number; size: number; flags: number }[];
  tlbEntries?: number;
  ring: boolean;
  ringBytes: number;
  withBitmap: boolean;
  pml: boolean;
}): number {
  // Sizes that are not whole pages are refused per slot, with their own message.
  const slotBytes = v.memslots.reduce((n, s) => n + (s.size > 0 && s.size % PAGE_SIZE === 0 ? Memslot.bytesFor(s.gpa, s.size, s.flags, v.ring, v.withBitmap) : 0), 0);
  return slotBytes + v.vcpus * (8 * (v.tlbEntries || DEFAULT_TLB_ENTRIES) + DirtyRing.bytesFor(v.ringBytes / ENTRY_BYTES) + 4 * BATCH) + (v.pml ? Pml.bytesFor(v.vcpus) : 0);
}

export class Hypervisor {
  readonly vms = new Map<string, Vm>();
  /** A page-tracking device is registered (page_tracking_device_registered()). */
  deviceRegistered = false;
  /** The registered device's driver, while one is. */
  pageTracking: PageTrackingDriver | null = null;
  private nextVmid: number;
  /** Host physical addresses are handed out linearly; they only label descriptors. */
  private nextHostAddress = 0x80000000;

  constructor(readonly options: HypervisorOptions) {
    this.nextVmid = options.shard?.firstVmid ?? 1;
  }

  /** Bytes the VMs' typed arrays hold now. */
  get memoryInUse(): number {
    let n = 0;
    for (const vm of this.vms.values()) n += vm.allocatedBytes;
    return n;
  }

  vm(name: string): Vm {
    if (!name) throw invalidArgument("vm name is empty");
    const vm = this.vms.get(name);
    if (!vm) throw notFound(`no VM named '${echo(name)}'`);
    if (vm.busy) throw new DomainError("aborted", `VM '${vm.name}' is busy ${vm.busy}; retry when that is done`);
    return vm;
  }

  createVm(spec: CreateVmSpec): Vm {
    if (!NAME_RE.test(spec.name)) throw invalidArgument(`VM name '${echo(spec.name)}' must be 1-63 letters, digits, '.', '_' or '-'`);
    if (this.vms.has(spec.name)) throw alreadyExists(`a VM named '${spec.name}' already exists`, "EEXIST");
    if (!Number.isInteger(spec.vcpus) || spec.vcpus < 1 || spec.vcpus > MAX_VCPUS) {
      throw invalidArgument(`vcpus ${spec.vcpus} must be in [1, ${MAX_VCPUS}] (KVM_MAX_VCPUS)`, "EINVAL");
    }
    const ipaBits = spec.ipaBits || DEFAULT_IPA_BITS;
    if (ipaBits < 32 || ipaBits > 48) throw invalidArgument(`ipa_bits ${ipaBits} must be in [32, 48] (KVM_VM_TYPE_ARM_IPA_SIZE)`, "EINVAL");
    const tlbEntries = spec.tlbEntries || DEFAULT_TLB_ENTRIES;
    if (tlbEntries > 65536 || (tlbEntries & (tlbEntries - 1)) !== 0) {
      throw invalidArgument(`tlb_entries ${tlbEntries} must be a power of two up to 65536`);
    }
    const speed = spec.realtimeSpeed || 1;
    if (!(speed > 0 && speed <= 1000)) throw invalidArgument(`realtime_speed ${spec.realtimeSpeed} must be in (0, 1000]`);
    const arch = ARCHES[spec.arch];
    if (spec.pml && !arch.assists.includes("pml")) throw invalidArgument(`create VM: PML is Intel's (x86_64); this VM is ${arch.name}`, "EINVAL");
    if (spec.eagerSplitChunkSize !== 0 && !arch.ownCaps.includes(CAP.ARM_EAGER_SPLIT_CHUNK_SIZE)) {
      throw invalidArgument("create VM: KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE is arm64's (x86's TDP MMU splits eagerly by its module parameter: eager_page_split)", "EINVAL");
    }
    if (spec.eagerPageSplit !== undefined && arch.name !== "x86_64") {
      throw invalidArgument("create VM: eager_page_split is x86's kvm module parameter; arm64 splits eagerly by eager_split_chunk_size", "EINVAL");
    }
    // KVM's order: the ring before any vCPU exists, its backup bitmap before any memslot.
    let ringBytes = 0;
    if (spec.dirtyRing) {
      ringBytes = this.ringSize(spec.arch, spec.dirtyRing.capability, spec.dirtyRing.bytes);
      checkRingBytes(ringBytes, false, false, arch.cpuDirtyLogSize(spec.pml));
    }
    const bytes = vmStateBytes({ ...spec, tlbEntries, ring: spec.dirtyRing !== null, ringBytes, withBitmap: Boolean(spec.dirtyRing?.withBitmap) });
    this.checkBudget(bytes, `VM '${spec.name}' (${formatBytes(spec.memslots.reduce((n, s) => n + s.size, 0))} of guest memory, ${spec.vcpus} vCPUs)`);
    const vm = new Vm({
      name: spec.name,
      vmid: this.nextVmid,
      vcpus: spec.vcpus,
      backing: spec.backing,
      ipaBits,
      clock: spec.clock,
      realtimeSpeed: speed,
      seed: spec.seed,
      tlbEntries,
      costs: this.options.costs,
      ringBytes,
      arch: spec.arch,
      pml: spec.pml,
      eagerPageSplit: arch.name === "x86_64" && (spec.eagerPageSplit ?? true),
    });
    if (spec.dirtyRing?.withBitmap) this.enableCap(vm, CAP.DIRTY_LOG_RING_WITH_BITMAP, 0, []);
    if (spec.eagerSplitChunkSize !== 0) this.enableCap(vm, CAP.ARM_EAGER_SPLIT_CHUNK_SIZE, 0, [BigInt(spec.eagerSplitChunkSize)]);
    for (const s of spec.memslots) this.setUserMemoryRegion(vm, s);
    if (spec.workload) {
      this.validateWorkload(vm, spec.workload);
      this.checkTraces(vm, undefined, spec.workload);
    }
    this.nextVmid += this.options.shard?.vmidStride ?? 1;
    this.vms.set(vm.name, vm);
    if (spec.workload) vm.setWorkload(undefined, spec.workload);
    if (spec.startPaused) for (const v of vm.vcpus) v.paused = true;
    return vm;
  }

  /** KVM_DESTROY_VM: an advance in progress stops, the device lets go, notifiers hear the end. */
  async destroyVm(name: string): Promise<void> {
    const vm = this.vm(name);
    vm.destroyed = true;
    if (this.pageTracking?.owns(vm)) await this.pageTracking.detach(vm);
    vm.writeTrack.closeAll(notFound(`VM ${echo(name)} was destroyed`));
    this.vms.delete(name);
  }

  /**
   * Runs a stepped VM for durationNs in slices of sliceMs of wall time,
   * awaiting between() after each so that other calls get the event loop;
   * between() may throw to stop (a cancelled call). Observed writes reach
   * the page-tracking device after every slice.
   */
  async advance(vm: Vm, durationNs: number, sliceMs: number, between: () => Promise<void>): Promise<void> {
    if (vm.advancing) throw failedPrecondition(`advance: VM ${vm.name} is already advancing (one AdvanceVm at a time)`, "EBUSY");
    vm.advancing = true;
    try {
      vm.beginAdvance(durationNs);
      while (!vm.continueAdvance(sliceMs)) {
        this.pageTracking?.flushReports();
        await between();
        if (vm.destroyed) throw notFound(`advance: VM ${vm.name} was destroyed while it advanced`);
      }
    } finally {
      vm.advancing = false;
    }
    this.pageTracking?.flushReports();
  }

  /** Explicit guest writes (GuestWrite); what the device's agent saw goes to it. */
  /**
   * GuestWrite: the batch is checked whole before any write is applied; each
   * write reports whether it was performed. In the stepped drive the VM's
   * clock then moves to the latest writing vCPU's, so that the time the
   * writes took is not silently taken from that vCPU in the next AdvanceVm.
   */
  guestWrites(vm: Vm, writes: { vcpu: number; gpa: number; value: bigint }[]) {
    vm.checkGuestWrites(writes);
    const out = writes.map((w) => vm.guestWrite(w.vcpu, w.gpa, w.value));
    if (vm.config.clock === "stepped") for (const w of writes) vm.clockNs = Math.max(vm.clockNs, vm.vcpus[w.vcpu].time);
    this.pageTracking?.flushReports();
    return out;
  }

  /**
   * KVM_GET_DIRTY_LOG: kvm_arch_sync_dirty_log first (the device's read, or
   * DBM's descriptor scan inside the VM's GET), then snapshot and clear.
   */
  async getDirtyLog(vm: Vm, slot: number, vcpusRun = false): Promise<GetDirtyLogResult & { numPages: number; costs: SyncCosts }> {
    const dev = this.pageTracking?.owns(vm) ? await this.pageTracking.sync(vm) : { pages: 0, hostNs: 0 };
    const r = bitmapLog.getDirtyLog(vm, slot, vcpusRun);
    r.hostNs += dev.hostNs;
    r.pagesSynced += dev.pages;
    const costs: SyncCosts = { get: r.hostNs };
    if (dev.hostNs) costs.device_read = dev.hostNs;
    if (vm.hwDirty === "dbm") costs.dbm_scan = r.scanNs;
    return { ...r, costs };
  }

  /** KVM_CLEAR_DIRTY_LOG, after the arch sync (omitted when the log started all set, as seed 003 does). */
  async clearDirtyLog(vm: Vm, slot: number, firstPage: number, numPages: number, bitmap: Uint8Array, vcpusRun = false): Promise<ClearDirtyLogResult> {
    const skipSync = vm.manualProtect && vm.initiallySet;
    const dev = !skipSync && this.pageTracking?.owns(vm) ? await this.pageTracking.sync(vm) : { hostNs: 0 };
    const r = bitmapLog.clearDirtyLog(vm, slot, firstPage, numPages, bitmap, vcpusRun);
    r.hostNs += dev.hostNs;
    return r;
  }

  /** ENABLE_CAP(ARM_PAGE_TRACKING_DEVICE): 1 hands vm's hardware dirty state to the device, 0 takes it back. */
  async setPageTracking(vm: Vm, flags: number, args: bigint[]): Promise<void> {
    const what = "ENABLE_CAP(ARM_PAGE_TRACKING_DEVICE)";
    if (!vm.arch.assists.includes("device")) throw invalidArgument(`${what}: the page-tracking device is arm64's; VM ${vm.name} is ${vm.arch.name}`, "EINVAL");
    const on = args[0] ?? 0n;
    if (flags !== 0 || on > 1n) throw invalidArgument(`${what}: args[0] must be 1 (on) or 0 (off)`, "EINVAL");
    if (on === 1n) {
      if (!this.pageTracking) throw failedPrecondition(`${what}: no page-tracking device is registered`, "EINVAL");
      await this.pageTracking.attach(vm);
    } else if (this.pageTracking?.owns(vm)) await this.pageTracking.detach(vm);
  }

  /** Refuses an allocation of extra bytes for what that would take this hypervisor past its budget. */
  checkBudget(extra: number, what: string): void {
    const ledger = this.options.shard?.ledger;
    const check = () => {
      const budget = this.options.memoryBudgetBytes;
      const mine = this.memoryInUse;
      const inUse = mine + (ledger?.others() ?? 0);
      if (inUse + extra > budget) {
        throw resourceExhausted(
          `${what} needs ${formatBytes(extra)} of hypervisor memory, but ${formatBytes(Math.max(0, budget - inUse))} of this hypervisor's ` +
            `${formatBytes(budget)} budget is left (HYPERVISOR_MEMORY_BUDGET; the model holds about 16 bytes per 4 KiB guest page)`,
          "ENOMEM",
        );
      }
      // Reserved until the worker publishes what its call allocated.
      ledger?.publish(mine + extra);
    };
    if (ledger) ledger.locked(check);
    else check();
  }

  /** KVM_SET_USER_MEMORY_REGION: create, change flags, or delete (size 0). Returns host ns. */
  setUserMemoryRegion(vm: Vm, m: MemslotSpec): number {
    const what = "SET_USER_MEMORY_REGION";
    if (m.flags & ~KNOWN_FLAGS) throw invalidArgument(`${what}: unknown flags 0x${(m.flags & ~KNOWN_FLAGS).toString(16)}`, "EINVAL");
    const as = m.slot >>> 16;
    const id = m.slot & 0xffff;
    if (as >= vm.arch.addressSpaces) throw invalidArgument(`${what}: address space ${as} does not exist on ${vm.arch.name}`, "EINVAL");
    if (as !== 0) throw invalidArgument(`${what}: address space ${as} (SMM) is not modelled`, "EINVAL");
    if (id >= USER_MEM_SLOTS) throw invalidArgument(`${what}: slot id ${id} >= KVM_USER_MEM_SLOTS (${USER_MEM_SLOTS})`, "EINVAL");
    if (m.gpa % PAGE_SIZE !== 0) throw invalidArgument(`${what}: guest_phys_addr 0x${m.gpa.toString(16)} is not 4 KiB aligned`, "EINVAL");
    if (m.size % PAGE_SIZE !== 0) throw invalidArgument(`${what}: memory_size ${m.size} is not a multiple of 4 KiB`, "EINVAL");
    const old = vm.slots.get(m.slot);
    if (m.size === 0) {
      if (!old) throw notFound(`${what}: cannot delete slot ${m.slot}: VM ${vm.name} has no such slot`, "EINVAL");
      vm.deleteSlot(old);
      return 0;
    }
    if (m.size / PAGE_SIZE > MAX_SLOT_PAGES) {
      throw invalidArgument(`${what}: memory_size ${formatBytes(m.size)} exceeds KVM_MEM_MAX_NR_PAGES (2^31 - 1 pages)`, "EINVAL");
    }
    if (m.gpa + m.size > 2 ** vm.config.ipaBits) {
      throw invalidArgument(
        `${what}: slot [0x${m.gpa.toString(16)}, 0x${(m.gpa + m.size).toString(16)}) is beyond the VM's ${vm.config.ipaBits}-bit IPA space`,
        "EFAULT",
      );
    }
    if (old) {
      if (old.size !== m.size) throw invalidArgument(`${what}: slot ${m.slot} cannot change size (${old.size} -> ${m.size})`, "EINVAL");
      if (old.gpa !== m.gpa) {
        throw invalidArgument(`${what}: moving slot ${m.slot} (KVM_MR_MOVE) is not modelled; delete and recreate it`, "EINVAL");
      }
      if ((old.flags ^ m.flags) & KVM_MEM_READONLY) throw invalidArgument(`${what}: READONLY cannot change on a live slot`, "EINVAL");
      if (m.flags & ~old.flags & KVM_MEM_LOG_DIRTY_PAGES) this.checkBudget(Memslot.loggingBytesFor(old.npages, vm.ringEnabled, vm.ringWithBitmap), `the dirty log of slot ${m.slot}`);
      return vm.setSlotFlags(old, m.flags);
    }
    for (const s of vm.slots.values()) {
      if (m.gpa < s.endGpa && s.gpa < m.gpa + m.size) {
        throw invalidArgument(
          `${what}: slot ${m.slot} [0x${m.gpa.toString(16)}, 0x${(m.gpa + m.size).toString(16)}) overlaps slot ${s.id} [0x${s.gpa.toString(16)}, 0x${s.endGpa.toString(16)})`,
          "EEXIST",
        );
      }
    }
    if (this.vms.get(vm.name) === vm) {
      this.checkBudget(Memslot.bytesFor(m.gpa, m.size, m.flags, vm.ringEnabled, vm.ringWithBitmap), `slot ${m.slot} of ${formatBytes(m.size)}`);
    }
    const hostBase = this.nextHostAddress;
    // Align host backing like the guest so that blocks are possible (KVM checks userspace_addr vs GPA alignment).
    this.nextHostAddress += Math.ceil(m.size / 2 ** 30) * 2 ** 30;
    return vm.addSlot(new Memslot(m.slot, m.gpa, m.size, m.flags, hostBase + (m.gpa % 2 ** 30)));
  }

  /** The ring capability's size argument (u32 in the kernel), for a ring variant the architecture offers. */
  private ringSize(arch: Arch, cap: number, arg: bigint): number {
    if (!ARCHES[arch].ringCaps.includes(cap)) {
      throw invalidArgument(
        cap === CAP.DIRTY_LOG_RING
          ? "ENABLE_CAP(DIRTY_LOG_RING): arm64 is weakly ordered and offers only DIRTY_LOG_RING_ACQ_REL"
          : `dirty ring: capability ${cap} is not a dirty-ring capability`,
        "EINVAL",
      );
    }
    return Number(arg & 0xffffffffn);
  }

  /** KVM_CHECK_EXTENSION; vm is null for the system-wide query, which answers for arm64 (the default). */
  checkExtension(vm: Vm | null, cap: number): number {
    const arch = vm?.arch ?? ARM64;
    const owner = capOwner(cap);
    if (owner && owner !== arch.name) return 0;
    if (owner === "arm64") return ARM64.checkOwnCap(cap, this.deviceRegistered);
    switch (cap) {
      case CAP.DIRTY_LOG_RING:
      case CAP.DIRTY_LOG_RING_ACQ_REL:
        return arch.ringCaps.includes(cap) ? MAX_ENTRIES * ENTRY_BYTES : 0;
      case CAP.DIRTY_LOG_RING_WITH_BITMAP:
        return 1;
      case CAP.MANUAL_DIRTY_LOG_PROTECT2:
        return Number(MANUAL_PROTECT_ENABLE | INITIALLY_SET);
      default:
        return 0;
    }
  }

  /** KVM_ENABLE_CAP on a VM. */
  enableCap(vm: Vm, cap: number, flags: number, args: bigint[]): void {
    const what = `ENABLE_CAP(${cap})`;
    const arg0 = args[0] ?? 0n;
    const owner = capOwner(cap);
    if (owner && owner !== vm.arch.name) throw invalidArgument(`${what}: capability ${cap} is ${owner}'s; VM ${vm.name} is ${vm.arch.name}`, "EINVAL");
    if (owner === "arm64") return ARM64.enableOwnCap(vm, cap, flags, args, (bytes, what) => this.checkBudget(bytes, what));
    switch (cap) {
      case CAP.MANUAL_DIRTY_LOG_PROTECT2: {
        const allowed = arg0 & MANUAL_PROTECT_ENABLE ? MANUAL_PROTECT_ENABLE | INITIALLY_SET : MANUAL_PROTECT_ENABLE;
        if (flags !== 0) throw invalidArgument(`${what}: flags must be 0`, "EINVAL");
        if (arg0 & ~allowed) {
          throw invalidArgument(
            arg0 & INITIALLY_SET && !(arg0 & MANUAL_PROTECT_ENABLE)
              ? `${what}: INITIALLY_SET requires MANUAL_PROTECT_ENABLE`
              : `${what}: unknown bits in args[0] = 0x${arg0.toString(16)}`,
            "EINVAL",
          );
        }
        vm.manualProtectFlags = arg0;
        return;
      }
      case CAP.DIRTY_LOG_RING:
      case CAP.DIRTY_LOG_RING_ACQ_REL:
        checkRingBytes(this.ringSize(vm.config.arch, cap, arg0), vm.ringEnabled, vm.vcpus.length > 0, vm.arch.cpuDirtyLogSize(vm.config.pml));
        return;
      case CAP.DIRTY_LOG_RING_WITH_BITMAP:
        if (!vm.ringEnabled) throw failedPrecondition(`${what}: DIRTY_LOG_RING_WITH_BITMAP needs a dirty ring first`, "EINVAL");
        if (flags !== 0) throw invalidArgument(`${what}: flags must be 0`, "EINVAL");
        if (vm.slots.size > 0) throw failedPrecondition(`${what}: DIRTY_LOG_RING_WITH_BITMAP can only be enabled before any memslot exists`, "EINVAL");
        vm.ringWithBitmap = true;
        return;
      default:
        throw invalidArgument(`${what}: capability ${cap} is not supported`, "EINVAL");
    }
  }

  /** kvm_write_track_add_gfn, within the budget (a slot's first tracked page allocates its counts). */
  addWriteTracking(vm: Vm, gfn: number): number {
    const wt = writeTrackerOf(vm, "write track add");
    const slot = vm.slotOfGpa(gfn * PAGE_SIZE);
    if (slot) this.checkBudget(wt.bytesToTrack(slot), `write tracking in slot ${slot.id}`);
    return addWriteTracking(vm, gfn);
  }

  validateWorkload(vm: Vm, w: WorkloadSpec, what = "workload"): void {
    if (!Number.isFinite(w.writesPerSecond) || w.writesPerSecond < 0 || w.writesPerSecond > 1e9) {
      throw invalidArgument(`${what} writes_per_second ${w.writesPerSecond} must be in [0, 1e9]`);
    }
    const total = vm.totalWritablePages;
    if (w.pattern !== "idle" && total === 0) throw invalidArgument(`${what}: the VM has no writable memslot to write to`);
    if (w.firstPage > total || w.pages > total - w.firstPage) {
      throw invalidArgument(`${what}: working set [${w.firstPage}, ${w.firstPage + w.pages}) runs past the VM's ${total} writable pages`);
    }
    if (!(w.hotFraction > 0 && w.hotFraction <= 1)) throw invalidArgument(`${what} hot_fraction ${w.hotFraction} must be in (0, 1]`);
    if (!(w.hotWriteFraction >= 0 && w.hotWriteFraction <= 1)) {
      throw invalidArgument(`${what} hot_write_fraction ${w.hotWriteFraction} must be in [0, 1]`);
    }
    if (!(w.zipfSkew > 0 && w.zipfSkew <= 10)) throw invalidArgument(`${what} zipf_skew ${w.zipfSkew} must be in (0, 10]`);
    w.phases.forEach((p, k) => this.validateWorkload(vm, p.spec, `workload phase ${k}`));
    if (w.trace) {
      const bad = w.trace.pages.find((p) => p >= total);
      if (bad !== undefined) throw invalidArgument(`${what}: trace page ${bad} is past the VM's ${total} writable pages`);
    }
  }

  /**
   * Traces set on vCPUs (all of them when vcpu is undefined): GetVcpuState
   * carries every vCPU's, so the VM's together stay within one message
   * (MAX_TRACE_PAGES), and their arrays count against the budget.
   */
  checkTraces(vm: Vm, vcpu: number | undefined, w: WorkloadSpec): void {
    if (!w.trace) return;
    const pagesOf = (s: WorkloadSpec) => s.trace?.pages.length ?? 0;
    const total = vm.vcpus.reduce((n, v) => n + (vcpu === undefined || v.index === vcpu ? pagesOf(w) : pagesOf(vm.workloadOf(v.index))), 0);
    if (total > MAX_TRACE_PAGES) throw invalidArgument(`the VM's traces would hold ${total} pages over its vCPUs; at most ${MAX_TRACE_PAGES} (GetVcpuState carries them all)`);
    this.checkBudget(w.trace.pages.byteLength + w.trace.offsets.byteLength, `the trace workload of VM ${vm.name}`);
  }
}

