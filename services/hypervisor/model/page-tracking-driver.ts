/**
 * The page-tracking device as arm64 KVM's code calls it (seed 000's
 * page_tracking_device ops): a VM enables and disables it, kvm_arch_sync_dirty_log
 * reads what it logged, and the writes the hardware agent observes reach it
 * after guest steps. The implementation that talks to a device process over
 * gRPC lives beside the server (device-registry.ts, device-link.ts); the
 * model sees only this.
 */
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
