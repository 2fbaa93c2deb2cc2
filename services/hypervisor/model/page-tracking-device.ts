/**
 * The page-tracking device as arm64 KVM's code calls it (seed 000's
 * page_tracking_device ops): a VM enables and disables it, kvm_arch_sync_dirty_log
 * reads what it logged, and the writes the hardware agent observes reach it
 * after guest steps. The implementation that talks to a device process over
 * gRPC lives beside the server (device-registry.ts, device-link.ts); the
 * model sees only this.
 */
import { failedPrecondition } from "../../../common/errors.js";
import { attachAssist, detachAssist, type HardwareDirty } from "./hardware-dirty.js";
import type { Memslot } from "./memslot.js";
import type { Vcpu } from "./vcpu.js";
import type { Vm } from "./vm.js";

export interface PageTrackingDriver {
  /** True when vm's hardware dirty state is the device's to log. */
  owns(vm: Vm): boolean;
  /** allocate_tracker + enable_tracking(-1): later fault-free writes go to the device. */
  attach(vm: Vm): Promise<void>;
  /** disable_tracking, flush, read the rest, release_tracker: back to write protection. */
  detach(vm: Vm): Promise<void>;
  /** Every write reported before now reaches the device, which is flushed and read into vm's bitmaps. */
  sync(vm: Vm): Promise<{ pages: number; hostNs: number }>;
  /** Sends the writes observed since the last call (after each guest step). */
  flushReports(): void;
}

/**
 * The arm64 side of the device (seed 000): a write fault while logging maps
 * its page with DBM, so the first write to a page faults and is logged by KVM
 * and later ones complete without a fault; the GPA of each of those is what
 * the device's agent observes, handed to the driver's sink. The device's log
 * is read by the driver's asynchronous sync, not here.
 */
export class DeviceAssist implements HardwareDirty {
  readonly name = "device";
  readonly dbmOnProtect = false;
  readonly dbmOnFault = true;
  readonly allocatedBytes = 0;

  constructor(private readonly sink: (vcpu: number, gpa: number) => void) {}

  recorded(v: Vcpu, _slot: Memslot, _p: number, gfn: number): number {
    this.sink(v.index, gfn * 4096);
    return 0;
  }

  sync(): { pages: number; hostNs: number } {
    return { pages: 0, hostNs: 0 };
  }

  vcpuPut(): void {}

  stop(): void {}
}

/** ENABLE_CAP(ARM_PAGE_TRACKING_DEVICE) on: later fault-free writes go to sink. Re-enabled after an overflow: a fresh sink. */
export function enableDeviceMode(vm: Vm, sink: (vcpu: number, gpa: number) => void): void {
  const what = "ENABLE_CAP(ARM_PAGE_TRACKING_DEVICE)";
  if (vm.ringEnabled) throw failedPrecondition(`${what}: VM ${vm.name} has a dirty ring, which the device does not support yet`, "EINVAL");
  if (vm.hw?.name === "device") vm.hw = null;
  attachAssist(vm, new DeviceAssist(sink), what);
}

/** The device was disabled cleanly (its last pages read): back to plain write protection. */
export function disableDeviceMode(vm: Vm): void {
  if (vm.hw?.name === "device") detachAssist(vm);
}

/**
 * The device failed: whatever it had not reported is unknown, so every page
 * of every logging slot is dirty; DBM goes, and writes fault again. Returns
 * the pages marked.
 */
export function deviceLost(vm: Vm): number {
  let pages = 0;
  for (const s of vm.slots.values()) {
    const bm = s.dirtyBitmap;
    if (!bm) continue;
    const full = s.npages >>> 5;
    bm.fill(-1, 0, full);
    if (s.npages & 31) bm[full] |= (2 ** (s.npages & 31) - 1) | 0;
    pages += s.npages;
  }
  disableDeviceMode(vm);
  return pages;
}

/** GPAs the device returned: each marked in its slot's bitmap; unknown GPAs are ignored, as KVM does. Returns pages newly marked. */
export function markDirtyGpas(vm: Vm, gpas: Float64Array | number[]): number {
  let slot: Memslot | undefined;
  let added = 0;
  for (const gpa of gpas) {
    const gfn = Math.floor(gpa / 4096);
    if (!slot || !slot.containsGfn(gfn)) slot = [...vm.slots.values()].find((s) => s.containsGfn(gfn));
    if (slot?.dirtyBitmap && slot.markDirty(gfn - slot.baseGfn)) added++;
  }
  return added;
}
