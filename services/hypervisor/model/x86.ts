/**
 * x86_64 (arch/x86/kvm, the TDP MMU with EPT): entries with R/W/X and the
 * accessed and dirty bits (ept.ts); logging by write protection, or with
 * Intel PML (pml.ts) by clearing D bits, the hardware logging the GPA of each
 * write that sets one; eager splitting by kvm's eager_page_split parameter;
 * both dirty-ring variants (TSO); write tracking (write-track.ts); two
 * address spaces (the second is SMM's, which the model does not populate).
 */
import { CAP, type KvmArch } from "./arch.js";
import { eptEntry } from "./ept.js";
import { handleWriteFault } from "./fault.js";
import { hardwareSetDirty } from "./hardware-dirty.js";
import { PML_ENTRIES } from "./pml.js";
import { ExactProtect } from "./protect-masked.js";
import type { Vcpu } from "./vcpu.js";
import type { Vm } from "./vm.js";

/** Every exit drains the vCPU's PML buffer first (vmx_flush_pml_buffer in vmx_handle_exit). */
const exitDrains = (vm: Vm, v: Vcpu) => vm.hw?.vcpuExit?.(v);

export const X86_64: KvmArch = {
  name: "x86_64",
  ownCaps: [],
  ringCaps: [CAP.DIRTY_LOG_RING, CAP.DIRTY_LOG_RING_ACQ_REL],
  assists: ["pml"],
  writeTracking: true,
  addressSpaces: 2,

  view: (lo, hi, level, vm) => ({ ...eptEntry(lo, hi, level, vm.config.pml), dbm: false }),

  cpuDirtyLogSize: (pml) => (pml ? PML_ENTRIES : 0),

  eagerSplit: (vm) => vm.config.eagerPageSplit,

  // Both walks visit each set bit of the mask; with PML they clear D bits (huge pages are write-protected).
  protectMasked: (vm, slot, split) => new ExactProtect(slot, split, vm.config.pml),

  // kvm_mmu_slot_apply_flags: with PML, kvm_mmu_slot_leaf_clear_dirty and huge pages write-protected; else write protection.
  protectSlot: (vm, slot) => slot.s2.writeProtectAll(vm.config.pml),

  // With PML, every vCPU is kicked out so that its buffer drains.
  syncDirtyLog: (vm, slot) => (vm.hw ? vm.hw.sync(slot) : { pages: 0, hostNs: 0 }),

  // KVM_REQ_TLB_FLUSH on every vCPU: INVEPT of the whole EPT.
  flushRemoteTlbs: (vm) => vm.flushAllTlbs(),

  // An EPT violation is an exit: the PML buffer drains, then the TDP MMU's fault path.
  handleWriteFault: (vm, v, slot, p, gfn, level, lo, hi, t) => {
    exitDrains(vm, v);
    return handleWriteFault(vm, v, slot, p, gfn, level, lo, hi, t);
  },

  hardwareDirtyUpdate: hardwareSetDirty,

  vcpuExit: exitDrains,
};
