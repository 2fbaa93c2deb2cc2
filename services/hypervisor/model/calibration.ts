/**
 * From a host's measured KVM costs to the cost model's parts. Each measured
 * figure is a whole guest pass or a whole ioctl; the model rebuilds it from
 * parts counted once (dirty-bitmap.ts, dirty-ring.ts, vm.ts), so fitting is
 * solving those sums for the parts. The same fit gives the defaults (from
 * the reference host of shared/reference/real-kvm-measurements.md) and the
 * file `calibrate` writes (from this host, measured by
 * clients/calibrate/kvm-harness.c).
 *
 * What the fit does not use is held back: `npm run fidelity` compares the
 * model's prediction of it with the measurement.
 */
import type { CostModel } from "./cost-model.js";

/** A host's measurements, medians in ns, for one slot of `pages` 4 KiB pages mapped at 4 KiB. */
export interface HostMeasurements {
  pages: number;
  /** A guest pass, logging off, every page mapped and writable: per page. */
  writeNsPerPage: number;
  /** A guest pass writing each page once after logging write-protected it: per page (fault, fix-up, write). */
  writeFaultNsPerPage: number;
  /** A guest pass over pages never mapped: per page. */
  firstTouchNsPerPage?: number;
  /** Two vCPUs faulting at once, each on its half: per page, per vCPU. */
  twoVcpuFaultNsPerPage: number;
  enableLoggingNs: number;
  disableLoggingNs: number;
  enableLoggingInitiallySetNs: number;
  /** Logging on over THP backing, every page touched (one 2 MiB entry per 512 pages). */
  enableLoggingThpNs?: number;
  /** Logging on over a slot of which one page in 8 was ever mapped (every line of descriptors, an eighth of the entries). */
  enableLoggingSparseNs?: number;
  /** Logging off over THP backing after a logging pass split every block. */
  disableLoggingThpNs?: number;
  getAllDirtyNs: number;
  getNoneDirtyNs: number;
  /** GET with one dirty page in each 64-page word. */
  getSparseNs?: number;
  manualGetAllDirtyNs: number;
  clearSlotNs: number;
  clear64PagesNs: number;
  ringHarvestNsPerEntry: number;
  ringResetNsPerEntry: number;
  /** KVM_RUN returning to the VMM on an I/O exit and entered again. */
  userspaceExitNs?: number;
}

/** The reference host (1 GiB slot). */
export const REFERENCE_HOST: Readonly<HostMeasurements> = Object.freeze({
  pages: 262144,
  writeNsPerPage: 15,
  writeFaultNsPerPage: 2430,
  twoVcpuFaultNsPerPage: 2850,
  enableLoggingNs: 10.3e6,
  disableLoggingNs: 11.2e6,
  enableLoggingInitiallySetNs: 0.06e6,
  getAllDirtyNs: 7.9e6,
  getNoneDirtyNs: 0.011e6,
  manualGetAllDirtyNs: 0.015e6,
  clearSlotNs: 6.4e6,
  clear64PagesNs: 2300,
  ringHarvestNsPerEntry: 2.5,
  ringResetNsPerEntry: 33,
});

/**
 * [ASSUMED] Of what a 64-page CLEAR leaves for its fixed part (the ioctl and
 * the TLB flush it includes), the flush's share: no measurement separates
 * them (500 of the reference host's 736 ns).
 */
export const TLB_FLUSH_SHARE = 500 / 736;

export type FittedCosts = Pick<
  CostModel,
  | "writeNs"
  | "writeFaultNs"
  | "faultSerialNs"
  | "ioctlNs"
  | "bitmapWordScanNs"
  | "bitmapWordCopyNs"
  | "getPageWriteProtectNs"
  | "clearPageWriteProtectNs"
  | "enableLoggingPageNs"
  | "disableLoggingPageNs"
  | "enableLoggingInitiallySetNs"
  | "tlbFlushNs"
  | "ringHarvestEntryNs"
  | "ringResetEntryNs"
> &
  Partial<Pick<CostModel, "translationFaultNs" | "userspaceExitNs" | "protectMaskedCallNs" | "loggingWalkPageNs" | "loggingEntryLineNs" | "collapseZapEntryNs">>;

/**
 * Solves the model's sums for its parts. Every part comes out >= 0, or the
 * measurements contradict the model and the fit says which; with onNegative,
 * such a part is set to 0 and reported instead (a difference of two figures
 * smaller than the host's noise: calibrate's short runs).
 */
export function fitCostModel(m: HostMeasurements, onNegative?: (part: string, ns: number) => void): FittedCosts {
  const P = m.pages;
  const W = Math.ceil(P / 64);
  // The sums (dirty-bitmap.ts, dirty-ring.ts), with K the ioctl and the flush it includes, C the masked-protect call
  // of each non-empty word:
  //   GET nothing dirty  = ioctl + W scan              CLEAR of 64 pages = K + scan + C + 64 clear
  //   GET all dirty      = K + W (scan + C) + P page    CLEAR of the slot  = K + W (scan + C) + P clear
  //   GET one per word   = K + W (scan + C) + W page    (without it, C = 0 and the page figures carry the call)
  // The scan needs the ioctl, which needs K: a fixed point, reached in a few steps.
  let scan = 0;
  let call = 0;
  let clear = 0;
  let fixed = 0;
  let page = 0;
  for (let i = 0; i < 50; i++) {
    clear = (m.clearSlotNs - m.clear64PagesNs - (W - 1) * (scan + call)) / (P - 64);
    fixed = m.clear64PagesNs - scan - call - 64 * clear;
    const ioctl = fixed * (1 - TLB_FLUSH_SHARE);
    scan = (m.getNoneDirtyNs - ioctl) / W;
    if (m.getSparseNs !== undefined) {
      page = (m.getAllDirtyNs - m.getSparseNs) / (P - W);
      call = (m.getSparseNs - fixed - W * scan - W * page) / W;
    } else page = (m.getAllDirtyNs - fixed - W * scan) / P;
  }
  const tlbFlushNs = fixed * TLB_FLUSH_SHARE;
  const ioctlNs = fixed - tlbFlushNs;
  // Enable = P walk + lines x line + entries x entry + flush (dirty-bitmap.ts; 8 page descriptors to a line, a block alone):
  //   every page mapped at 4 KiB: P / 8 lines, P entries;  one page in 8: P / 8 lines, P / 8 entries;
  //   THP backing: B = P / 512 blocks, each a line and an entry.
  // Without the sparse figure the line is 0, without THP the page walk (the entry figure carries them).
  const B = P / 512;
  const full = m.enableLoggingNs - tlbFlushNs;
  let entry = full / P;
  let walk = 0;
  let line = 0;
  if (m.enableLoggingSparseNs !== undefined) {
    entry = (m.enableLoggingNs - m.enableLoggingSparseNs) / (P - P / 8);
    // P walk + (P / 8) line = full - P entry; with THP, P walk + B line = thp - B entry.
    const a = full - P * entry;
    if (m.enableLoggingThpNs !== undefined) {
      const b = m.enableLoggingThpNs - tlbFlushNs - B * entry;
      line = (a - b) / (P / 8 - B);
      walk = (b - B * line) / P;
    } else line = a / (P / 8);
  } else if (m.enableLoggingThpNs !== undefined) {
    entry = (m.enableLoggingNs - m.enableLoggingThpNs) / (P - B);
    walk = (m.enableLoggingThpNs - tlbFlushNs - B * entry) / P;
  }
  const disablePage = (m.disableLoggingNs - P * walk - (P / 8) * line) / P;
  const out: FittedCosts = {
    writeNs: m.writeNsPerPage,
    writeFaultNs: m.writeFaultNsPerPage - m.writeNsPerPage,
    // mmu-lock.ts: N vCPUs faulting back to back take max(c, N s) each; with N = 2, s = t2 / 2
    // (exact when t2 > c; when the two vCPUs did not slow each other, an upper bound).
    faultSerialNs: m.twoVcpuFaultNsPerPage / 2,
    ioctlNs,
    bitmapWordScanNs: scan,
    bitmapWordCopyNs: (m.manualGetAllDirtyNs - ioctlNs) / W,
    getPageWriteProtectNs: page,
    clearPageWriteProtectNs: clear,
    enableLoggingPageNs: entry,
    disableLoggingPageNs: disablePage,
    enableLoggingInitiallySetNs: m.enableLoggingInitiallySetNs,
    tlbFlushNs,
    // The harness's ring pass writes pages in order: 64 entries make one mask, one call.
    ringHarvestEntryNs: m.ringHarvestNsPerEntry,
    ringResetEntryNs: m.ringResetNsPerEntry - call / 64,
  };
  if (m.getSparseNs !== undefined) out.protectMaskedCallNs = call;
  if (m.enableLoggingThpNs !== undefined) out.loggingWalkPageNs = walk;
  if (m.enableLoggingSparseNs !== undefined) out.loggingEntryLineNs = line;
  // Disabling over THP after a logging pass: every page is a 4 KiB leaf that a block can map again, so all P are zapped.
  if (m.disableLoggingThpNs !== undefined) out.collapseZapEntryNs = (m.disableLoggingThpNs - m.disableLoggingNs - tlbFlushNs) / P;
  if (m.firstTouchNsPerPage !== undefined) out.translationFaultNs = m.firstTouchNsPerPage - m.writeNsPerPage;
  if (m.userspaceExitNs !== undefined) out.userspaceExitNs = m.userspaceExitNs;
  const negative = Object.entries(out).filter(([, v]) => !(v >= 0));
  if (onNegative)
    for (const [k, v] of negative) {
      onNegative(k, v);
      out[k as keyof FittedCosts] = 0;
    }
  else if (negative.length > 0) throw new RangeError(`the measurements contradict the cost model: ${negative.map(([k, v]) => `${k} = ${v}`).join(", ")}`);
  return out;
}

/** One measured series of kvm-harness's report. */
export interface HarnessSeries {
  what: string;
  samples: number;
  min: number;
  median: number;
  max: number;
}

/** The JSON kvm-harness prints (clients/calibrate/kvm-harness.c). */
export interface HarnessReport {
  harness: "kvm-harness";
  kvm_api_version: number;
  caps: { dirty_log_ring_bytes: number; dirty_log_ring_with_bitmap: number; manual_dirty_log_protect2: number };
  online_cpus: number;
  slot_bytes: number;
  reps: number;
  small_ring_entries: number;
  /** The never-stopping guest's totals: pages changed between reads, and of those reported one collection later. */
  race?: { changed_pages: number; late_pages: number };
  lost_pages: number;
  wall_ns: number;
  measurements: Record<string, HarnessSeries>;
}

/** The harness's medians as the fit's input; a series the fit needs and the report lacks is an error naming it. */
export function hostFromHarness(r: HarnessReport): HostMeasurements {
  const need = (name: string): number => {
    const s = r.measurements[name];
    if (!s || !Number.isFinite(s.median)) throw new RangeError(`the harness report has no '${name}' (this host's KVM may lack the feature it measures)`);
    return s.median;
  };
  const optional = (name: string): number | undefined => r.measurements[name]?.median;
  return {
    pages: r.slot_bytes / 4096,
    writeNsPerPage: need("write_ns_per_page"),
    writeFaultNsPerPage: need("write_fault_ns_per_page"),
    firstTouchNsPerPage: optional("first_touch_ns_per_page"),
    twoVcpuFaultNsPerPage: need("two_vcpu_fault_ns_per_page"),
    enableLoggingNs: need("enable_logging_ns"),
    disableLoggingNs: need("disable_logging_ns"),
    enableLoggingInitiallySetNs: need("enable_logging_initially_set_ns"),
    getAllDirtyNs: need("get_all_dirty_ns"),
    getNoneDirtyNs: need("get_none_dirty_ns"),
    getSparseNs: optional("get_sparse_ns"),
    enableLoggingThpNs: optional("enable_logging_thp_ns"),
    enableLoggingSparseNs: optional("enable_logging_sparse_ns"),
    disableLoggingThpNs: optional("disable_logging_thp_ns"),
    manualGetAllDirtyNs: need("manual_get_all_dirty_ns"),
    clearSlotNs: need("clear_slot_ns"),
    clear64PagesNs: need("clear_64_pages_ns"),
    ringHarvestNsPerEntry: need("ring_harvest_ns_per_entry"),
    ringResetNsPerEntry: need("ring_reset_ns_per_entry"),
    userspaceExitNs: optional("userspace_exit_ns"),
  };
}
