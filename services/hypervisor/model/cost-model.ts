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
import { fitCostModel, REFERENCE_HOST } from "./calibration.js";

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
  /** One kvm_arch_mmu_enable_log_dirty_pt_masked call: a non-empty 64-page word of GET or CLEAR, a mask of a ring reset. */
  protectMaskedCallNs: number;
  /** Toggling logging visits every page of the slot, mapped or not (the shadow MMU's rmap walk; 0 where only mapped entries are walked). */
  loggingWalkPageNs: number;
  /** Toggling logging: the cache miss of each 64-byte line of leaf descriptors that holds a mapped entry (Stage2.entryLines). */
  loggingEntryLineNs: number;
  /** x86, logging turned off over huge backing: zapping one 4 KiB leaf of a range a block can map again (kvm_mmu_zap_collapsible_sptes). */
  collapseZapEntryNs: number;
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
  /** KVM_RUN returning to the VMM and entered again: a kick (KickVcpus), a ring-full exit. */
  userspaceExitNs: number;
  /** Intel PML: draining one logged GPA into the dirty log. */
  pmlDrainEntryNs: number;
}

const FITTED = fitCostModel(REFERENCE_HOST);

export const DEFAULT_COSTS: Readonly<CostModel> = Object.freeze({
  // [KVM-HERE] every part the reference host's measurements determine, fitted in calibration.ts (the
  // derivation of each is there; test/calibration.test.ts checks that the model gives each figure back):
  // writeNs 15, writeFaultNs 2415, faultSerialNs 1425, ioctlNs 236, bitmapWordScanNs 2.63, bitmapWordCopyNs 3.6,
  // getPageWriteProtectNs 30.09, clearPageWriteProtectNs 24.37, enableLoggingPageNs 39.3, disableLoggingPageNs 42.7,
  // enableLoggingInitiallySetNs 60000, tlbFlushNs 500 (its share of a CLEAR's fixed part [ASSUMED]), ringHarvestEntryNs 2.5,
  // ringResetEntryNs 33.
  ...FITTED,
  translationFaultNs: FITTED.writeFaultNs, // [ASSUMED] same fault path as a permission fault; `calibrate` measures it
  protectMaskedCallNs: FITTED.protectMaskedCallNs ?? 0, // [ASSUMED] 0: no sparse GET was measured on the reference host, so its per-page figures carry the call; `calibrate` separates it
  loggingWalkPageNs: FITTED.loggingWalkPageNs ?? 0, // [ASSUMED] 0: only a 4 KiB-mapped slot was measured there; `calibrate` separates it with THP backing
  loggingEntryLineNs: FITTED.loggingEntryLineNs ?? 0, // [ASSUMED] 0: as above, the per-entry figures carry it; `calibrate` separates it with a sparsely mapped slot
  collapseZapEntryNs: FITTED.collapseZapEntryNs ?? FITTED.disableLoggingPageNs, // [ASSUMED] as the disable walk's per-entry cost; `calibrate` measures it with THP backing
  splitBlockNs: 31400, // [LIT] derived from Matlack v2: eager split at enable 1.547 s for 96 GiB = 49152 2M blocks
  emulatedWriteNs: 1000, // [ASSUMED] instruction emulation plus one notifier call
  // [LIT] derived from Shameer RFC v2: dirty memory time 0.41 s with DBM, 96 vCPUs each writing its own 512 MB (131072 pages) at
  // once: the update happens in each vCPU in parallel, so 0.41 s / 131072 = 3128 ns per page and vCPU, less the write itself.
  dbmUpdateNs: 0.41e9 / 131072 - FITTED.writeNs,
  dbmScanPteNs: 2.4, // [LIT] seed 003 / Keqian RFC: scanning the PTEs of 64 GB takes about 40 ms
  deviceReadCallNs: 1000, // [ASSUMED] one driver call into the device; no public figure for the Graviton PTA
  deviceReadGpaNs: 5, // [ASSUMED] set_bit per returned GPA
  hdbssEntryNs: 2, // [ASSUMED] one 64-bit store beside the descriptor update; no HDBSS figure is published
  hdbssFullFaultNs: FITTED.writeFaultNs, // [ASSUMED] the stage-2 permission-fault path, as a write-protection fault
  hdbssFlushEntryNs: 10, // [ASSUMED] decode one entry and set its bit under mmu_lock (set_bit as deviceReadGpaNs, plus the slot lookup)
  pmlLogNs: 2, // [ASSUMED] one 8-byte store by the CPU beside the D-bit update (PML overhead 0.06-0.45% [LIT], Kai Huang 2015, secondary)
  pmlFullExitNs: 1500, // [ASSUMED] a light VM exit and re-entry with no instruction emulation
  userspaceExitNs: 1500, // [ASSUMED] no reference figure; `calibrate` measures it (an I/O exit to the VMM and back)
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
