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
import { PAGES_2M } from "./descriptor.js";
import { blockLevelFor, handleWriteFault } from "./fault.js";
import { hardwareSetDirty } from "./hardware-dirty.js";
import { PML_ENTRIES } from "./pml.js";
import { ExactProtect } from "./protect-masked.js";
import type { Memslot } from "./memslot.js";
import { Level } from "./stage2.js";
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

  recoverHugePages: zapCollapsible,
};

/**
 * kvm_mmu_zap_collapsible_sptes: every range of the slot that a block could
 * map (the backing and write tracking allow it) loses its 4 KiB leaves and
 * their table, so that the next access faults and maps the block again.
 */
function zapCollapsible(vm: Vm, slot: Memslot): number {
  const s2 = slot.s2;
  let zapped = 0;
  for (let p = 0; p < slot.npages; p += PAGES_2M - ((slot.baseGfn + p) % PAGES_2M)) {
    if (blockLevelFor(vm, slot, p) === Level.Page) continue;
    const first = p - ((slot.baseGfn + p) % PAGES_2M);
    let leaves = 0;
    for (let q = first; q < first + PAGES_2M; q++) if (s2.leafLevel(q) === Level.Page) leaves++;
    if (leaves === 0) continue;
    s2.unmapRange(first, first + PAGES_2M);
    s2.dropTable(first);
    vm.invalidateRangeAll(slot.baseGfn + first, PAGES_2M);
    zapped += leaves;
  }
  return zapped;
}
