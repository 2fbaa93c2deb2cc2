/**
 * The cost model: what each simulated event costs, in nanoseconds. Costs
 * charged to a vCPU slow the guest; costs charged to the host lengthen the
 * call that incurred them. Every default names its source; a user replaces
 * any of them with a JSON file of the same keys (HYPERVISOR_COST_MODEL).
 *
 * Sources:
 *  [KVM-HERE] shared/reference/real-kvm-measurements.md: /dev/kvm driven
 *             directly on this project's machine kind (1 GiB slot, medians).
 *  [LIT]      shared/reference/kvm-dirty-tracking.md section 7 (literature).
 *  [ASSUMED]  no published or measured figure; the value is an estimate.
 *
 * Copying a page to the destination is the migration link's cost (bandwidth
 * and latency, in the migration controller), not the hypervisor's.
 */
import { readFileSync } from "node:fs";
import { ConfigError } from "../../../common/config.js";

export interface CostModel {
  /** A guest write through a writable, mapped page. */
  writeNs: number;
  /** A stage-2 permission fault and its fix-up (write-protected page, first write while logging). */
  writeFaultNs: number;
  /** A stage-2 translation fault that maps the page (first touch). */
  translationFaultNs: number;
  /** The part of a stage-2 fault that holds mmu_lock: vCPUs faulting at once queue for it (mmu-lock.ts). */
  faultSerialNs: number;
  /** One fixed cost per dirty-log ioctl (syscall entry, slots_lock). */
  ioctlNs: number;
  /** Scanning one 64-bit word of a dirty bitmap. */
  bitmapWordScanNs: number;
  /** Copying one 64-bit bitmap word out to userspace. */
  bitmapWordCopyNs: number;
  /** Snapshot, clear and re-protect of one dirty page inside GET_DIRTY_LOG. */
  getPageWriteProtectNs: number;
  /** Clearing and re-protecting one dirty page inside CLEAR_DIRTY_LOG. */
  clearPageWriteProtectNs: number;
  /** Write-protecting one mapped leaf entry (a 4 KiB page, or a whole block) when logging is enabled on a slot. */
  enableLoggingPageNs: number;
  /** Turning logging off, per mapped leaf entry of the slot. */
  disableLoggingPageNs: number;
  /** Enabling logging with INITIALLY_SET (a fixed cost per slot: the bitmap is set, nothing is protected). */
  enableLoggingInitiallySetNs: number;
  /** Splitting one 2 MiB block into 512 page descriptors. */
  splitBlockNs: number;
  /** A VMID-wide TLB invalidation (TLBI VMALLS12E1IS + DSB). */
  tlbFlushNs: number;
  /** The VMM collecting one dirty-ring entry. */
  ringHarvestEntryNs: number;
  /** KVM_RESET_DIRTY_RINGS, per entry (re-protection included). */
  ringResetEntryNs: number;
  /** Emulating one write to a write-tracked page and calling the notifiers (on top of the fault). */
  emulatedWriteNs: number;
  /** The hardware's clean -> dirty descriptor update on a write (DBM), charged to the vCPU. */
  dbmUpdateNs: number;
  /** Scanning one stage-2 descriptor for hardware dirty state in kvm_arch_sync_dirty_log. */
  dbmScanPteNs: number;
  /** One read_dirty_pages call to the page-tracking device driver (up to 512 GPAs). */
  deviceReadCallNs: number;
  /** Marking one GPA the device returned dirty. */
  deviceReadGpaNs: number;
  /** FEAT_HDBSS: appending an entry to the vCPU's buffer, on top of the DBM update. */
  hdbssEntryNs: number;
  /** FEAT_HDBSS: the HDBSSF permission fault of a full buffer (the exit and re-entry, before the flush). */
  hdbssFullFaultNs: number;
  /** FEAT_HDBSS: flushing one buffer entry into the dirty log. */
  hdbssFlushEntryNs: number;
  /** Intel PML: logging the GPA of a write that set a D bit, on top of the D-bit update. */
  pmlLogNs: number;
  /** Intel PML: the PML-full VM exit and re-entry, before the drain. */
  pmlFullExitNs: number;
  /** A vCPU kicked out of KVM_RUN and back in (KickVcpus: an IPI, an exit, a re-entry). */
  vcpuKickNs: number;
  /** Intel PML: draining one logged GPA into the dirty log. */
  pmlDrainEntryNs: number;
}

export const DEFAULT_COSTS: Readonly<CostModel> = Object.freeze({
  writeNs: 15, // [KVM-HERE] guest write to a writable, mapped page: 15 ns per page
  writeFaultNs: 2430, // [KVM-HERE] write-protection fault and fix-up while logging: 2.43 us per page
  translationFaultNs: 2430, // [ASSUMED] same fault path as a permission fault ([KVM-HERE] 2.43 us)
  faultSerialNs: 1425, // [KVM-HERE] derived: two vCPUs faulting at once take 2.85 us per fault each = 2 x the serialized part (1.43 us per page aggregate)
  // The [KVM-HERE] ioctl figures are whole calls: each is rebuilt from these parts, every part counted
  // once (test/calibration.test.ts checks that the model gives each figure back).
  ioctlNs: 236, // [KVM-HERE] derived: CLEAR of one 64-page chunk 2.3 us, minus 64 x clearPageWriteProtectNs, one word and the flush it includes
  bitmapWordScanNs: 2.63, // [KVM-HERE] derived: GET with no page dirty 0.011 ms per GiB (snapshot and copy-out of 4096 words) minus the ioctl
  bitmapWordCopyNs: 3.6, // [KVM-HERE] derived: manual-protect GET, all dirty, 0.015 ms per GiB (4096 words copied) minus the ioctl
  getPageWriteProtectNs: 30.09, // [KVM-HERE] derived: GET, every page dirty, 7.9 ms per GiB, minus the ioctl, the words and the flush, / 262144 pages
  clearPageWriteProtectNs: 24.37, // [KVM-HERE] derived: CLEAR of the whole slot, every page dirty, 6.4 ms per GiB, minus the ioctl, the words and the flush
  enableLoggingPageNs: 39.3, // [KVM-HERE] derived: enable logging 10.3 ms per GiB / 262144 pages, every page mapped at 4 KiB
  disableLoggingPageNs: 42.7, // [KVM-HERE] derived: disable logging 11.2 ms per GiB / 262144 pages, every page mapped at 4 KiB
  enableLoggingInitiallySetNs: 60000, // [KVM-HERE] enable logging with INITIALLY_SET: 0.06 ms per 1 GiB slot
  splitBlockNs: 31400, // [LIT] derived from Matlack v2: eager split at enable 1.547 s for 96 GiB = 49152 2M blocks
  tlbFlushNs: 500, // [ASSUMED] share of the 736 ns that a 64-page CLEAR ([KVM-HERE] 2.3 us) leaves for the ioctl and the flush it includes together
  ringHarvestEntryNs: 2.5, // [KVM-HERE] dirty ring: userspace harvest about 2.5 ns per entry
  ringResetEntryNs: 33, // [KVM-HERE] dirty ring: KVM_RESET_DIRTY_RINGS about 33 ns per entry
  emulatedWriteNs: 1000, // [ASSUMED] instruction emulation plus one notifier call
  dbmUpdateNs: 32, // [LIT] derived from Shameer RFC v2: dirty memory time 0.41 s for 96 vCPUs x 512 MB with DBM (write included)
  dbmScanPteNs: 2.4, // [LIT] seed 003 / Keqian RFC: scanning the PTEs of 64 GB takes about 40 ms
  deviceReadCallNs: 1000, // [ASSUMED] one driver call into the device; no public figure for the Graviton PTA
  deviceReadGpaNs: 5, // [ASSUMED] set_bit per returned GPA
  hdbssEntryNs: 2, // [ASSUMED] one 64-bit store beside the descriptor update; no HDBSS figure is published
  hdbssFullFaultNs: 2430, // [ASSUMED] the stage-2 permission-fault path, as a write-protection fault ([KVM-HERE] 2.43 us)
  hdbssFlushEntryNs: 10, // [ASSUMED] decode one entry and set its bit under mmu_lock (set_bit as deviceReadGpaNs, plus the slot lookup)
  pmlLogNs: 2, // [ASSUMED] one 8-byte store by the CPU beside the D-bit update (PML overhead 0.06-0.45% [LIT], Kai Huang 2015, secondary)
  pmlFullExitNs: 1500, // [ASSUMED] a light VM exit and re-entry with no instruction emulation
  vcpuKickNs: 1500, // [ASSUMED] as pmlFullExitNs: a light exit (here forced by an IPI) and re-entry
  pmlDrainEntryNs: 10, // [ASSUMED] kvm_vcpu_mark_page_dirty per GPA, as hdbssFlushEntryNs
});

export function loadCostModel(path?: string): CostModel {
  if (!path) return { ...DEFAULT_COSTS };
  let parsed: unknown;
  try {
    parsed = JSON.parse(readFileSync(path, "utf8"));
  } catch (err) {
    throw new ConfigError(`cannot read cost model ${path}: ${(err as Error).message}`);
  }
  return mergeCostModel(parsed, path);
}

export function mergeCostModel(overrides: unknown, where = "cost model"): CostModel {
  if (typeof overrides !== "object" || overrides === null || Array.isArray(overrides)) {
    throw new ConfigError(`${where}: expected a JSON object of cost names to nanoseconds`);
  }
  const out: CostModel = { ...DEFAULT_COSTS };
  for (const [k, v] of Object.entries(overrides)) {
    if (k.startsWith("$")) continue; // "$comment", "$source" and the like
    if (!(k in DEFAULT_COSTS)) throw new ConfigError(`${where}: unknown cost '${k}' (known: ${Object.keys(DEFAULT_COSTS).join(", ")})`);
    if (typeof v !== "number" || !Number.isFinite(v) || v < 0) throw new ConfigError(`${where}: ${k} must be a number of nanoseconds >= 0`);
    out[k as keyof CostModel] = v;
  }
  return out;
}
