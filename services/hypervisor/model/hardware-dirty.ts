/**
 * The hardware dirty-state assists, as the generic code reaches them: how
 * write protection and the write-fault handler prepare descriptors for a
 * hardware clean -> dirty update (arm64: DBM with S2AP_W clear; x86: W with
 * the D bit clear), where such an update is recorded, and what
 * kvm_arch_sync_dirty_log, a VM exit and vcpu_put do. A VM has at most one;
 * each lives in a file named after it: dbm.ts (seed 003),
 * page-tracking-device.ts (seed 000), hdbss.ts (FEAT_HDBSS), pml.ts (Intel PML).
 */
import { failedPrecondition, invalidArgument } from "../../../common/errors.js";
import type { Memslot } from "./memslot.js";
import type { Vcpu } from "./vcpu.js";
import type { Vm } from "./vm.js";

export type HardwareDirtyName = "dbm" | "device" | "hdbss" | "pml";

/** What an assist may ask of its VM: the generic core's mark_page_dirty, by frame. */
export interface HardwareDirtyVm {
  readonly vcpus: Vcpu[];
  /** Injected bugs an assist honours (SetFaultInjection). */
  readonly injected: { readonly skipHwLogDrain: boolean };
  /** Marks guest frame gfn dirty in its slot's log (kvm_vcpu_mark_page_dirty); false if it was already, or no slot logs it. */
  markGfnDirty(v: Vcpu | null, gfn: number): boolean;
}

export interface HardwareDirty {
  readonly name: HardwareDirtyName;
  /** Write protection makes writable descriptors writable-clean (DBM set): seed 003's way. */
  readonly dbmOnProtect: boolean;
  /** A write fault while logging maps its page with DBM, so later writes are the hardware's (seed 000, HDBSS v3). */
  readonly dbmOnFault: boolean;
  /**
   * The hardware made page p of slot writable-dirty for vCPU v (no fault).
   * Returns what it cost the vCPU beyond the update itself (a buffer-full fault).
   */
  recorded(v: Vcpu, slot: Memslot, p: number, gfn: number): number;
  /** kvm_arch_sync_dirty_log's part before slot's log is read. Returns pages added and host ns. */
  sync(slot: Memslot): { pages: number; hostNs: number };
  /** vcpu_put: a vCPU leaves the CPU (a pause), and per-vCPU state goes to the log. */
  vcpuPut(v: Vcpu): void;
  /** Any VM exit of v (a fault, MMIO): PML drains the vCPU's buffer at every exit. */
  vcpuExit?(v: Vcpu): void;
  /** Logging with a dirty ring is allowed (PML drains into rings; the arm64 assists sync into bitmaps only). */
  readonly allowsRing?: boolean;
  /** kvm_cpu_dirty_log_size(): ring entries reserved for one drain of this log. */
  readonly cpuDirtyLogSize?: number;
  /** The assist is turned off: what it holds goes to the log first. */
  stop(): void;
  /** Bytes of its own state (the memory budget counts them). */
  readonly allocatedBytes: number;
}

export const HW_NAMES: Record<HardwareDirtyName, string> = {
  dbm: "hardware dirty logging (DBM scan)",
  device: "the page-tracking device",
  hdbss: "FEAT_HDBSS",
  pml: "Intel PML",
};

/**
 * Turns an assist on for vm: one at a time, one the architecture has, and
 * none with a dirty ring unless it drains into rings (the arm64 seeds and
 * series sync hardware state into bitmaps only). Turning the same one on again
 * keeps the one in force.
 */
export function attachAssist(vm: Vm, hw: HardwareDirty, what: string): void {
  if (vm.ringEnabled && !hw.allowsRing) throw failedPrecondition(`${what}: VM ${vm.name} logs to dirty rings; hardware dirty state syncs into bitmaps only`, "EINVAL");
  if (!vm.arch.assists.includes(hw.name)) throw invalidArgument(`${what}: VM ${vm.name} is ${vm.arch.name}, which has no ${HW_NAMES[hw.name]}`, "EINVAL");
  if (vm.hw && vm.hw.name !== hw.name) throw failedPrecondition(`${what}: ${HW_NAMES[vm.hw.name]} already owns VM ${vm.name}'s hardware dirty state`, "EBUSY");
  vm.hw ??= hw;
}

/**
 * Turns vm's assist off: what it and the descriptors hold goes to the logs
 * first, then DBM is cleared and every logging slot write-protected again, so
 * that writes fault and are logged as before.
 */
export function detachAssist(vm: Vm): void {
  if (!vm.hw) return;
  vm.hw.stop();
  for (const s of vm.slots.values()) {
    if (s.dirtyBitmap) s.pagesDirtied += s.s2.scanDirtyInto(s.dirtyBitmap);
    s.s2.clearDbmAll();
    if (s.logging) s.s2.writeProtectAll();
  }
  vm.hw = null;
  vm.flushAllTlbs();
}

/**
 * The hardware's clean -> dirty update on a TLB miss (Arm ARM D8.5.2: DBM
 * sets S2AP_W; EPT: the D bit, bit 9), no fault; the assist records it,
 * and returns what a full log cost (HDBSSF, PML-full). Returns the cost.
 */
export function hardwareSetDirty(vm: Vm, v: Vcpu, slot: Memslot, p: number, gfn: number): number {
  const extra = vm.hw!.recorded(v, slot, p, gfn);
  slot.s2.hwSetDirty(p);
  v.tlb.fill(gfn);
  vm.hwDirtyUpdates++;
  v.dirtied();
  return vm.costs.dbmUpdateNs + extra;
}
