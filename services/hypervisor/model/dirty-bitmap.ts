/**
 * Write protection + dirty bitmap: KVM_GET_DIRTY_LOG, KVM_CLEAR_DIRTY_LOG,
 * MANUAL_PROTECT and INITIALLY_SET, and what turning LOG_DIRTY_PAGES on and
 * off does to the stage-2 table (virt/kvm/kvm_main.c, arch/arm64/kvm/mmu.c).
 *
 * Ordering (seed 004): snapshot-and-clear each word, write-protect its pages,
 * flush TLBs, and only then hand the snapshot out. A write that slips through
 * a stale TLB entry before the flush is already in the snapshot; every write
 * after the flush faults and is logged for the next round.
 */
import type { CostModel } from "./cost-model.js";
import type { Memslot } from "./memslot.js";
import { invalidArgument } from "../../../common/errors.js";

export interface DirtyLogVm {
  readonly costs: CostModel;
  readonly manualProtect: boolean;
  readonly initiallySet: boolean;
  readonly eagerSplit: boolean;
  /** A dirty ring is configured (pages are pushed to rings, not set in the bitmap). */
  readonly ringEnabled: boolean;
  /** DIRTY_LOG_RING_WITH_BITMAP: the slots keep a backup bitmap beside the rings. */
  readonly ringWithBitmap: boolean;
  /** Hardware dirty logging with DBM set while write-protecting (seed 003). */
  readonly dbmOnProtect: boolean;
  /** kvm_arch_sync_dirty_log: moves hardware dirty state into the slot's bitmap. */
  archSync(slot: Memslot): { pages: number; hostNs: number };
  /** Flushes every vCPU's TLB after write protection; false when a test switch skipped it. */
  flushTlbsAfterWriteProtect(): boolean;
}

export interface GetDirtyLogResult {
  bitmap: Int32Array;
  dirtyPages: number;
  /** Pages the arch sync added, and its host time. */
  pagesSynced: number;
  scanNs: number;
  pagesWriteProtected: number;
  tlbFlushed: boolean;
  hostNs: number;
}

export interface ClearDirtyLogResult {
  pagesCleared: number;
  tlbFlushed: boolean;
  hostNs: number;
}

export function popcount32(x: number): number {
  x -= (x >>> 1) & 0x55555555;
  x = (x & 0x33333333) + ((x >>> 2) & 0x33333333);
  return (((x + (x >>> 4)) & 0x0f0f0f0f) * 0x01010101) >>> 24;
}

const ctz32 = (x: number) => 31 - Math.clz32(x & -x);

/**
 * Write-protects, for each 64-page word, pages ffs(mask)..fls(mask)
 * (kvm_arch_mmu_enable_log_dirty_pt_masked), merging the ranges of adjacent
 * words into one walk: the pages protected are the same, the walk is shorter.
 * Eager splitting happens here only when the log started all set; otherwise
 * it already happened at enable. Returns 2 MiB units split.
 */
class Protector {
  private start = -1;
  private end = -1;
  splitUnits = 0;
  constructor(
    private readonly slot: Memslot,
    private readonly split: boolean,
    private readonly setDbm: boolean,
  ) {}

  word(w: number, lo: number, hi: number): void {
    if (this.setDbm) return this.exactRuns(w, lo, hi);
    const base = w * 64;
    const first = base + (lo !== 0 ? ctz32(lo) : 32 + ctz32(hi));
    const last = base + (hi !== 0 ? 63 - Math.clz32(hi) : 31 - Math.clz32(lo));
    if (first === this.end) {
      this.end = last + 1;
      return;
    }
    this.flush();
    this.start = first;
    this.end = last + 1;
  }

  /**
   * With DBM's descriptor scan the descriptors are the log: a page between
   * ffs and fls of the mask but outside it may be writable-dirty in hardware
   * and not yet in the bitmap (CLEAR skips the sync when the log started all
   * set), and protecting it erases that: `bitmap+initially-set+dbm`
   * migrations lost pages. So with DBM only the mask's own runs are
   * protected. (Seed 003 says it saves "the dirty status to underlying
   * bitmap if dirty status is covered"; whether its write-protect walk does so
   * for these pages is not in our references.)
   */
  private exactRuns(w: number, lo: number, hi: number): void {
    const base = w * 64;
    for (let i = 0; i < 64; i++) {
      if (!(((i < 32 ? lo >>> i : hi >>> (i - 32)) & 1) === 1)) continue;
      if (base + i !== this.end) {
        this.flush();
        this.start = base + i;
      }
      this.end = base + i + 1;
    }
  }

  flush(): void {
    if (this.start < 0) return;
    this.slot.s2.writeProtectRange(this.start, this.end, this.setDbm);
    if (this.split) this.splitUnits += this.slot.s2.splitRange(this.start, this.end);
    this.start = this.end = -1;
  }
}

const splitsInClear = (vm: DirtyLogVm) => vm.manualProtect && vm.initiallySet && vm.eagerSplit;

export function getDirtyLog(vm: DirtyLogVm, slot: Memslot): GetDirtyLogResult {
  const bm = slot.dirtyBitmap!;
  const words = bm.length / 2;
  const c = vm.costs;
  const sync = vm.archSync(slot);
  const out = new Int32Array(bm.length);
  let dirty = 0;
  if (vm.manualProtect) {
    out.set(bm);
    for (let i = 0; i < bm.length; i++) if (bm[i] !== 0) dirty += popcount32(bm[i]);
    const hostNs = sync.hostNs + c.ioctlNs + words * c.bitmapWordCopyNs;
    return { bitmap: out, dirtyPages: dirty, pagesSynced: sync.pages, scanNs: sync.hostNs, pagesWriteProtected: 0, tlbFlushed: false, hostNs };
  }
  const protect = new Protector(slot, splitsInClear(vm), vm.dbmOnProtect);
  for (let w = 0; w < words; w++) {
    const lo = bm[2 * w];
    const hi = bm[2 * w + 1];
    if ((lo | hi) === 0) continue;
    out[2 * w] = lo;
    out[2 * w + 1] = hi;
    bm[2 * w] = 0;
    bm[2 * w + 1] = 0;
    dirty += popcount32(lo) + popcount32(hi);
    protect.word(w, lo, hi);
  }
  protect.flush();
  const splitUnits = protect.splitUnits;
  const tlbFlushed = dirty > 0 && vm.flushTlbsAfterWriteProtect();
  const hostNs =
    sync.hostNs +
    c.ioctlNs +
    words * (c.bitmapWordScanNs + c.bitmapWordCopyNs) +
    dirty * c.getPageWriteProtectNs +
    splitUnits * c.splitBlockNs +
    (tlbFlushed ? c.tlbFlushNs : 0);
  return { bitmap: out, dirtyPages: dirty, pagesSynced: sync.pages, scanNs: sync.hostNs, pagesWriteProtected: dirty, tlbFlushed, hostNs };
}

/** Validates CLEAR's range as kvm_clear_dirty_log_protect does (first_page's alignment is checked before the slot lookup). */
export function checkClearRange(slot: Memslot, firstPage: number, numPages: number, bitmapBytes: number): void {
  if (firstPage > slot.npages || numPages > slot.npages - firstPage) {
    throw invalidArgument(
      `CLEAR_DIRTY_LOG: pages [${firstPage}, ${firstPage + numPages}) run past slot ${slot.id}'s ${slot.npages} pages`,
      "EINVAL",
    );
  }
  if (numPages % 64 !== 0 && firstPage + numPages !== slot.npages) {
    throw invalidArgument(
      `CLEAR_DIRTY_LOG: num_pages ${numPages} is not a multiple of 64 and the range does not end at the slot's end (${slot.npages})`,
      "EINVAL",
    );
  }
  const need = Math.ceil(numPages / 64) * 8;
  if (bitmapBytes < need) {
    throw invalidArgument(`CLEAR_DIRTY_LOG: bitmap has ${bitmapBytes} bytes, ${numPages} pages need ${need}`, "EFAULT");
  }
}

/** KVM_CLEAR_DIRTY_LOG: clear the set bits that are also set in the log, and re-protect their pages. */
export function clearDirtyLog(vm: DirtyLogVm, slot: Memslot, firstPage: number, numPages: number, user: Int32Array): ClearDirtyLogResult {
  const bm = slot.dirtyBitmap!;
  const c = vm.costs;
  // Seed 003: "omit dirty log sync in log clear if initially all set".
  const syncNs = vm.manualProtect && vm.initiallySet ? 0 : vm.archSync(slot).hostNs;
  const firstWord = firstPage / 64;
  const words = Math.ceil(numPages / 64);
  let cleared = 0;
  const protect = new Protector(slot, splitsInClear(vm), vm.dbmOnProtect);
  for (let k = 0; k < words; k++) {
    const w = firstWord + k;
    const lo = user[2 * k] & bm[2 * w];
    const hi = user[2 * k + 1] & bm[2 * w + 1];
    if ((lo | hi) === 0) continue;
    bm[2 * w] &= ~lo;
    bm[2 * w + 1] &= ~hi;
    cleared += popcount32(lo) + popcount32(hi);
    protect.word(w, lo, hi);
  }
  protect.flush();
  const splitUnits = protect.splitUnits;
  const tlbFlushed = cleared > 0 && vm.flushTlbsAfterWriteProtect();
  const hostNs =
    syncNs + c.ioctlNs + words * c.bitmapWordScanNs + cleared * c.clearPageWriteProtectNs + splitUnits * c.splitBlockNs + (tlbFlushed ? c.tlbFlushNs : 0);
  return { pagesCleared: cleared, tlbFlushed, hostNs };
}

/**
 * LOG_DIRTY_PAGES turned on (kvm_alloc_dirty_bitmap, kvm_mmu_slot_apply_flags):
 * allocate the bitmap (with a ring, only WITH_BITMAP's backup bitmap); with
 * INITIALLY_SET it starts all ones and nothing is protected (CLEAR arms
 * protection piece by piece); otherwise write-protect the whole slot, split
 * its blocks when eager splitting is on, and flush. Returns host ns.
 */
export function enableLogging(vm: DirtyLogVm, slot: Memslot): number {
  const words = 2 * Math.ceil(slot.npages / 64);
  const c = vm.costs;
  if (vm.ringEnabled) slot.ringPending = new Int32Array(words);
  if (!vm.ringEnabled || vm.ringWithBitmap) {
    const bm = new Int32Array(words);
    slot.dirtyBitmap = bm;
    if (vm.manualProtect && vm.initiallySet) {
      const full = slot.npages >>> 5;
      bm.fill(-1, 0, full);
      if (slot.npages & 31) bm[full] = (2 ** (slot.npages & 31) - 1) >>> 0;
      return c.enableLoggingInitiallySetNs;
    }
  }
  slot.s2.writeProtectAll(vm.dbmOnProtect);
  const units = vm.eagerSplit ? slot.s2.splitRange(0, slot.npages) : 0;
  const flushed = vm.flushTlbsAfterWriteProtect();
  return slot.npages * c.enableLoggingPageNs + units * c.splitBlockNs + (flushed ? c.tlbFlushNs : 0);
}

/** LOG_DIRTY_PAGES turned off: the bitmap goes; mappings stay split until faults coalesce them. */
export function disableLogging(vm: DirtyLogVm, slot: Memslot): number {
  slot.dirtyBitmap = null;
  slot.ringPending = null;
  return slot.npages * vm.costs.disableLoggingPageNs;
}
