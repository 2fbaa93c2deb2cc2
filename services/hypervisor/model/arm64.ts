/**
 * arm64 (arch/arm64/kvm): stage-2 descriptors with S2AP and DBM, logging by
 * write protection; the assists hardware DBM with a descriptor scan
 * (seed 003, dbm.ts), FEAT_HDBSS (hdbss.ts) and the page-tracking device
 * (seed 000, page-tracking-device.ts); eager splitting by
 * KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE; only the ACQ_REL dirty ring (weakly
 * ordered); one address space. Its own capabilities are enabled here, as
 * arch/arm64/kvm/arm.c's kvm_vm_ioctl_enable_cap does.
 */
import { failedPrecondition, invalidArgument } from "../../../common/errors.js";
import { CAP, type KvmArch } from "./arch.js";
import { DbmScan } from "./dbm.js";
import { AF, HI_DBM, S2AP_R, S2AP_W, toU64 } from "./descriptor.js";
import { handleWriteFault } from "./fault.js";
import { attachAssist, detachAssist, hardwareSetDirty } from "./hardware-dirty.js";
import { Hdbss, MAX_ORDER } from "./hdbss.js";
import { ExactProtect, SpanProtect } from "./protect-masked.js";
import type { Vm } from "./vm.js";

/** KVM_CAP_ARM_SUPPORTED_BLOCK_SIZES with a 4 KiB granule: 4 KiB, 2 MiB, 1 GiB. */
export const SUPPORTED_BLOCK_SIZES = 2 ** 12 + 2 ** 21 + 2 ** 30;

/** Refuses an allocation of bytes for what beyond the hypervisor's memory budget. */
export type Budget = (bytes: number, what: string) => void;

export const ARM64: KvmArch & {
  checkOwnCap(cap: number, deviceRegistered: boolean): number;
  enableOwnCap(vm: Vm, cap: number, flags: number, args: bigint[], budget: Budget): void;
} = {
  name: "arm64",
  ownCaps: [CAP.ARM_EAGER_SPLIT_CHUNK_SIZE, CAP.ARM_SUPPORTED_BLOCK_SIZES, CAP.ARM_PAGE_TRACKING_DEVICE, CAP.ARM_HW_DIRTY_STATE_TRACK, CAP.ARM_HW_DIRTY_LOG],
  ringCaps: [CAP.DIRTY_LOG_RING_ACQ_REL],
  assists: ["dbm", "device", "hdbss"],
  writeTracking: false,
  addressSpaces: 1,

  view: (lo, hi) => ({
    descriptor: toU64(lo, hi),
    readable: (lo & S2AP_R) !== 0,
    writable: (lo & S2AP_W) !== 0,
    accessed: (lo & AF) !== 0,
    dirty: false,
    dbm: (hi & HI_DBM) !== 0,
  }),

  // The HDBSS series refuses the ring; DBM and the device sync into bitmaps: nothing to reserve.
  cpuDirtyLogSize: () => 0,

  eagerSplit: (vm) => vm.eagerSplitChunk !== 0,

  protectMasked: (vm, slot, split) => {
    const dbm = vm.hw?.dbmOnProtect ?? false;
    return dbm ? new ExactProtect(slot, split, true) : new SpanProtect(slot, split, false);
  },

  // kvm_mmu_wp_memory_region: stage2_wp_range over the slot, DBM set with seed 003.
  protectSlot: (vm, slot) => slot.s2.writeProtectAll(vm.hw?.dbmOnProtect ?? false),

  syncDirtyLog: (vm, slot) => (vm.hw ? vm.hw.sync(slot) : { pages: 0, hostNs: 0 }),

  // TLBI VMALLS12E1IS: the whole VMID (a range TLBI would cover the slot, which in the model is the same for any slot larger than a TLB).
  flushRemoteTlbs: (vm) => vm.flushAllTlbs(),

  // user_mem_abort.
  handleWriteFault,

  hardwareDirtyUpdate: hardwareSetDirty,

  // HDBSS drains on its own fault, on vcpu_put and on sync, not at every exit.
  vcpuExit: () => {},

  // arm64 leaves a slot split after logging: no collapse at disable (the stage-2 stays at 4 KiB until unmapped).
  recoverHugePages: () => 0,

  checkOwnCap(cap, deviceRegistered) {
    if (cap === CAP.ARM_PAGE_TRACKING_DEVICE) return deviceRegistered ? 1 : 0;
    if (cap === CAP.ARM_SUPPORTED_BLOCK_SIZES) return SUPPORTED_BLOCK_SIZES;
    return 1;
  },

  enableOwnCap(vm, cap, flags, args, budget) {
    const what = `ENABLE_CAP(${cap})`;
    const arg0 = args[0] ?? 0n;
    switch (cap) {
      case CAP.ARM_EAGER_SPLIT_CHUNK_SIZE: {
        if (flags !== 0) throw invalidArgument(`${what}: flags must be 0`, "EINVAL");
        const size = Number(arg0);
        if (size !== 0 && !(size === 2 ** 12 || size === 2 ** 21 || size === 2 ** 30)) {
          throw invalidArgument(`${what}: chunk size ${size} is not 0 or a supported block size (4 KiB, 2 MiB, 1 GiB)`, "EINVAL");
        }
        if (vm.slots.size > 0) throw failedPrecondition(`${what}: the eager split chunk size can only be set before any memslot exists`, "EINVAL");
        vm.eagerSplitChunk = size;
        return;
      }
      case CAP.ARM_SUPPORTED_BLOCK_SIZES:
        throw invalidArgument(`${what}: KVM_CAP_ARM_SUPPORTED_BLOCK_SIZES can only be queried`, "EINVAL");
      case CAP.ARM_HW_DIRTY_LOG:
        if (flags !== 0 || arg0 > 1n) throw invalidArgument(`${what}: args[0] must be 1 (on) or 0 (off)`, "EINVAL");
        return setDbmScan(vm, arg0 === 1n);
      case CAP.ARM_HW_DIRTY_STATE_TRACK: {
        if (flags !== 0 || (args[1] ?? 0n) > 1n) throw invalidArgument(`${what}: args[0] is the buffer order, args[1] 1 (on) or 0 (off)`, "EINVAL");
        return setHdbss(vm, args[1] === 1n, Number(arg0), budget);
      }
      case CAP.ARM_PAGE_TRACKING_DEVICE:
        throw failedPrecondition(`${what}: the page-tracking device is enabled through the hypervisor service, which talks to the device`, "EINVAL");
    }
  },
};

/** Seed 003's KVM_CAP_ARM_HW_DIRTY_LOG, on or off at any time (off leaves another assist alone). */
function setDbmScan(vm: Vm, on: boolean): void {
  if (on) attachAssist(vm, new DbmScan(vm.costs), "ENABLE_CAP(ARM_HW_DIRTY_LOG)");
  else if (vm.hw?.name === "dbm") detachAssist(vm);
}

/**
 * KVM_CAP_ARM_HW_DIRTY_STATE_TRACK (FEAT_HDBSS): on with a buffer of
 * 4 KiB x 2^order per vCPU, within the budget, or off (the buffers are
 * flushed first).
 */
function setHdbss(vm: Vm, on: boolean, order: number, budget: Budget): void {
  const what = "ENABLE_CAP(ARM_HW_DIRTY_STATE_TRACK)";
  if (!on) {
    if (vm.hw?.name === "hdbss") detachAssist(vm);
    return;
  }
  if (!Number.isInteger(order) || order < 0 || order > MAX_ORDER) throw invalidArgument(`${what}: buffer order ${order} must be in [0, ${MAX_ORDER}] (4 KiB to 2 MiB)`, "EINVAL");
  if (vm.hw instanceof Hdbss) {
    if (vm.hw.order !== order) throw failedPrecondition(`${what}: HDBSS is on with order ${vm.hw.order}; turn it off first`, "EBUSY");
    return;
  }
  budget(Hdbss.bytesFor(vm.vcpus.length, order), `HDBSS buffers of order ${order} for ${vm.vcpus.length} vCPUs`);
  attachAssist(vm, new Hdbss(vm, vm.vcpus.length, order, vm.costs), what);
}
