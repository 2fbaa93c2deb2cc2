/**
 * Seed 003's hardware DBM (KVM_CAP_ARM_HW_DIRTY_LOG): write protection sets
 * DBM on descriptors that were writable, so they become writable-clean and a
 * write makes them writable-dirty with no fault; kvm_arch_sync_dirty_log scans
 * the slot's descriptors for that state before every GET (about 40 ms per 64 GB
 * in the kernel). The descriptors are the log: nothing is recorded per write.
 */
import type { CostModel } from "./cost-model.js";
import type { HardwareDirty } from "./hardware-dirty.js";
import type { Memslot } from "./memslot.js";

export class DbmScan implements HardwareDirty {
  readonly name = "dbm";
  readonly dbmOnProtect = true;
  readonly dbmOnFault = false;
  readonly allocatedBytes = 0;

  constructor(private readonly costs: CostModel) {}

  recorded(): number {
    return 0;
  }

  sync(slot: Memslot): { pages: number; hostNs: number } {
    if (!slot.dirtyBitmap) return { pages: 0, hostNs: 0 };
    const pages = slot.s2.scanDirtyInto(slot.dirtyBitmap);
    slot.pagesDirtied += pages;
    return { pages, hostNs: slot.npages * this.costs.dbmScanPteNs };
  }

  vcpuPut(): void {}

  stop(): void {}
}
