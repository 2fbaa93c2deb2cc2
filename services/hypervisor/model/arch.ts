/**
 * The seam between the generic core (vm.ts, dirty-bitmap.ts, dirty-ring.ts:
 * what virt/kvm does) and an architecture (arm64.ts, x86.ts: what
 * arch/arm64/kvm and arch/x86/kvm do). The generic code reaches an
 * architecture only through this interface, at the points where KVM's
 * generic code calls kvm_arch_*: write protection by mask, the sync before a
 * GET, the TLB flush, the write-fault handler, the hardware dirty update on a
 * TLB miss and the exits it may take, and the ring's reserve. Its data says
 * which capabilities, ring variants and assists the architecture offers.
 */
import type { HardwareDirtyName } from "./hardware-dirty.js";
import type { Memslot } from "./memslot.js";
import type { Level } from "./stage2.js";
import type { Vcpu } from "./vcpu.js";
import type { Vm, WriteOutcome } from "./vm.js";

export type ArchName = "arm64" | "x86_64";

/** KVM capability numbers (include/uapi/linux/kvm.h, and the series' proposed ones: 239, 245; 1001 is this model's). */
export const CAP = {
  MANUAL_DIRTY_LOG_PROTECT2: 168,
  DIRTY_LOG_RING: 192,
  DIRTY_LOG_RING_ACQ_REL: 223,
  DIRTY_LOG_RING_WITH_BITMAP: 225,
  ARM_EAGER_SPLIT_CHUNK_SIZE: 228,
  ARM_SUPPORTED_BLOCK_SIZES: 229,
  ARM_PAGE_TRACKING_DEVICE: 239,
  ARM_HW_DIRTY_STATE_TRACK: 245,
  ARM_HW_DIRTY_LOG: 1001,
} as const;

export interface LeafView {
  descriptor: bigint;
  readable: boolean;
  writable: boolean;
  accessed: boolean;
  /** x86's D bit; arm64 has none (false). */
  dirty: boolean;
  /** arm64's DBM bit; x86 has none (false). */
  dbm: boolean;
}

/**
 * kvm_arch_mmu_enable_log_dirty_pt_masked for a batch of masks: mask() re-arms
 * the pages first + i for each bit i of the 64-bit mask (lo: bits 0-31, hi:
 * 32-63); done() ends the batch and returns the 2 MiB units it split.
 */
export interface MaskedProtect {
  mask(first: number, lo: number, hi: number): void;
  done(): number;
}

export interface KvmArch {
  readonly name: ArchName;
  /** Capabilities only this architecture has (the other checks them as 0 and refuses them). */
  readonly ownCaps: readonly number[];
  /** The dirty-ring capabilities it offers: arm64 is weakly ordered and offers only ACQ_REL; x86 (TSO) both. */
  readonly ringCaps: readonly number[];
  readonly assists: readonly HardwareDirtyName[];
  /** Write tracking (seed 002, arch/x86/kvm/mmu/page_track.c). */
  readonly writeTracking: boolean;
  /** KVM_ADDRESS_SPACE_NUM: address spaces a slot id's upper 16 bits may name (x86 has SMM's). */
  readonly addressSpaces: number;
  /** A leaf descriptor as TranslateGpa shows it. */
  view(lo: number, hi: number, level: Level, vm: Vm): LeafView;
  /** kvm_cpu_dirty_log_size(): ring entries one drain of a hardware log may push, reserved below the soft limit. */
  cpuDirtyLogSize(pml: boolean): number;
  /** Whether enabling logging splits blocks up front (eager) rather than on the first write fault. */
  eagerSplit(vm: Vm): boolean;
  /** Re-arms logging for the masked pages of slot (after GET, CLEAR, a ring reset); split: eager-split them too. */
  protectMasked(vm: Vm, slot: Memslot, split: boolean): MaskedProtect;
  /** Arms logging for a whole slot (LOG_DIRTY_PAGES turned on; kvm_mmu_slot_apply_flags). */
  protectSlot(vm: Vm, slot: Memslot): void;
  /** kvm_arch_sync_dirty_log, its synchronous part: hardware dirty state into slot's bitmap. Pages added, host ns. */
  syncDirtyLog(vm: Vm, slot: Memslot): { pages: number; hostNs: number };
  /** kvm_flush_remote_tlbs after write protection. */
  flushRemoteTlbs(vm: Vm): void;
  /** The write-fault handler: vCPU v's write to page p of slot (leaf at level) trapped. */
  handleWriteFault(vm: Vm, v: Vcpu, slot: Memslot, p: number, gfn: number, level: Level, lo: number, hi: number, t: number): WriteOutcome;
  /** The hardware's dirty update of a writable-clean page on a TLB miss (no fault); returns its cost, with any log-full exit. */
  hardwareDirtyUpdate(vm: Vm, v: Vcpu, slot: Memslot, p: number, gfn: number): number;
  /** Any other exit of v from the guest (MMIO): what the architecture does on every exit. */
  vcpuExit(vm: Vm, v: Vcpu): void;
  /** Logging turned off: unmaps what faults should map again as blocks; returns the 4 KiB leaves zapped. */
  recoverHugePages(vm: Vm, slot: Memslot): number;
}
