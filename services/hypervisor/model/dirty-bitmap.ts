/**
 * Write protection + dirty bitmap: KVM_GET_DIRTY_LOG, KVM_CLEAR_DIRTY_LOG,
 * MANUAL_PROTECT and INITIALLY_SET, and what turning LOG_DIRTY_PAGES on and
 * off does to the stage-2 / EPT table (virt/kvm/kvm_main.c), reaching the
 * architecture through arch.ts for the protection walk, the sync and the flush.
 *
 * Ordering (seed 004): snapshot-and-clear each word, write-protect its pages,
 * flush TLBs, and only then hand the snapshot out. A write that slips through
 * a stale TLB entry before the flush is already in the snapshot; every write
 * after the flush faults and is logged for the next round.
 */
import { popcount32 } from "./bits.js";
import type { Memslot } from "./memslot.js";
import { DomainError, failedPrecondition, invalidArgument } from "../../../common/errors.js";
import { GuestRunsThrough, mayRunThrough } from "./guest-runs-through.js";
import type { Vm } from "./vm.js";

export interface GetDirtyLogResult {
  bitmap: Int32Array;
  dirtyPages: number;
  /** Pages the arch sync added, and its host time. */
  pagesSynced: number;
  scanNs: number;
  pagesWriteProtected: number;
  tlbFlushed: boolean;
  hostNs: number;
  /** The guest ran through the ioctl (vcpusRun honoured): the VM's clock moved by hostNs. */
  vcpusRan: boolean;
}

export interface ClearDirtyLogResult {
  pagesCleared: number;
  tlbFlushed: boolean;
  hostNs: number;
  vcpusRan: boolean;
}


const splitsInClear = (vm: Vm) => vm.manualProtect && vm.initiallySet && vm.arch.eagerSplit(vm);

/** With the vCPUs running, the guest runs between chunks of this many words of a GET's or CLEAR's loop. */
export const SYNC_CHUNK_WORDS = 64;

/** The non-empty words and dirty pages of [firstWord, firstWord + words) of a bitmap ANDed with mask (or not). */
function census(bm: Int32Array, firstWord: number, words: number, mask: Int32Array | null): { calls: number; pages: number } {
  let calls = 0;
  let pages = 0;
  for (let k = 0; k < words; k++) {
    const w = firstWord + k;
    const lo = mask ? mask[2 * k] & bm[2 * w] : bm[2 * w];
    const hi = mask ? mask[2 * k + 1] & bm[2 * w + 1] : bm[2 * w + 1];
    if ((lo | hi) === 0) continue;
    calls++;
    pages += popcount32(lo) + popcount32(hi);
  }
  return { calls, pages };
}

/** The checks GET and CLEAR share, in KVM's order (ENXIO, then the slot id). */
function checkLogAccess(vm: Vm, id: number, what: string): void {
  if (vm.ringEnabled && !vm.ringWithBitmap) {
    throw failedPrecondition(`${what}: VM ${vm.name} logs to dirty rings; the bitmap interface needs DIRTY_LOG_RING_WITH_BITMAP`, "ENXIO");
  }
  if (id >>> 16 === 0 && (id & 0xffff) >= 32767) throw invalidArgument(`${what}: slot id ${id} >= KVM_USER_MEM_SLOTS`, "EINVAL");
}

/** The slot, which must have a bitmap. */
function loggingSlot(vm: Vm, id: number, what: string): Memslot {
  const slot = vm.slot(id, what);
  if (!slot.dirtyBitmap) throw failedPrecondition(`${what}: dirty logging is off for slot ${id} of VM ${vm.name}`, "ENOENT");
  return slot;
}

/** KVM_GET_DIRTY_LOG on slot slotId (the device's asynchronous read, if any, has happened). */
export function getDirtyLog(vm: Vm, slotId: number, vcpusRun = false): GetDirtyLogResult & { numPages: number } {
  checkLogAccess(vm, slotId, "GET_DIRTY_LOG");
  const slot = loggingSlot(vm, slotId, "GET_DIRTY_LOG");
  const r = snapshotAndProtect(vm, slot, mayRunThrough(vm, vcpusRun));
  // The injected bug: the bits are consumed, then the copy out fails.
  if (vm.injected.failEveryOtherGetCopy && vm.injected.getsSeen++ % 2 === 0) {
    throw new DomainError("aborted", `GET_DIRTY_LOG: copying the bitmap of slot ${slotId} out failed after it was cleared (an injected bug)`, "EFAULT");
  }
  return { ...r, numPages: slot.npages };
}

/** KVM_CLEAR_DIRTY_LOG on slot slotId with the user's bitmap (bytes, 64 pages a word). */
export function clearDirtyLog(vm: Vm, slotId: number, firstPage: number, numPages: number, bitmap: Uint8Array, vcpusRun = false): ClearDirtyLogResult {
  checkLogAccess(vm, slotId, "CLEAR_DIRTY_LOG");
  if (firstPage % 64 !== 0) throw invalidArgument(`CLEAR_DIRTY_LOG: first_page ${firstPage} is not a multiple of 64`, "EINVAL");
  const slot = loggingSlot(vm, slotId, "CLEAR_DIRTY_LOG");
  checkClearRange(slot, firstPage, numPages, bitmap.byteLength);
  const words = Math.ceil(numPages / 64);
  const user = new Int32Array(2 * words);
  new Uint8Array(user.buffer).set(bitmap.subarray(0, words * 8));
  return clearAndProtect(vm, slot, firstPage, numPages, user, mayRunThrough(vm, vcpusRun));
}

function snapshotAndProtect(vm: Vm, slot: Memslot, concurrent: boolean): GetDirtyLogResult {
  const bm = slot.dirtyBitmap!;
  const words = bm.length / 2;
  const c = vm.costs;
  const sync = vm.arch.syncDirtyLog(vm, slot);
  const out = new Int32Array(bm.length);
  let dirty = 0;
  if (vm.manualProtect) {
    out.set(bm);
    for (let i = 0; i < bm.length; i++) if (bm[i] !== 0) dirty += popcount32(bm[i]);
    const hostNs = sync.hostNs + c.ioctlNs + words * c.bitmapWordCopyNs;
    return { bitmap: out, dirtyPages: dirty, pagesSynced: sync.pages, scanNs: sync.hostNs, pagesWriteProtected: 0, tlbFlushed: false, hostNs, vcpusRan: false };
  }
  const protect = vm.arch.protectMasked(vm, slot, splitsInClear(vm));
  const perPage = c.getPageWriteProtectNs;
  let run: GuestRunsThrough | null = null;
  let elapsed = sync.hostNs + c.ioctlNs;
  if (concurrent) {
    const { calls, pages } = census(bm, 0, words, null);
    run = GuestRunsThrough.start(vm, true, true, elapsed + words * c.bitmapWordScanNs + calls * c.protectMaskedCallNs + pages * perPage + (pages > 0 ? c.tlbFlushNs : 0));
  }
  let calls = 0;
  for (let w = 0; w < words; w++) {
    if (run && w % SYNC_CHUNK_WORDS === 0) run.at(elapsed + w * c.bitmapWordScanNs + calls * c.protectMaskedCallNs + dirty * perPage);
    const lo = bm[2 * w];
    const hi = bm[2 * w + 1];
    if ((lo | hi) === 0) continue;
    calls++;
    out[2 * w] = lo;
    out[2 * w + 1] = hi;
    bm[2 * w] = 0;
    bm[2 * w + 1] = 0;
    dirty += popcount32(lo) + popcount32(hi);
    protect.mask(w * 64, lo, hi);
  }
  const splitUnits = protect.done();
  elapsed += words * c.bitmapWordScanNs + calls * c.protectMaskedCallNs + dirty * perPage;
  run?.at(elapsed); // the window of seed 004: pages protected, TLBs not yet flushed
  const tlbFlushed = dirty > 0 && vm.flushTlbsAfterWriteProtect();
  const hostNs =
    sync.hostNs +
    c.ioctlNs +
    // The nothing-dirty GET's per-word figure already includes copying the snapshot out.
    words * c.bitmapWordScanNs +
    calls * c.protectMaskedCallNs +
    dirty * perPage +
    splitUnits * c.splitBlockNs +
    (tlbFlushed ? c.tlbFlushNs : 0);
  run?.end(hostNs);
  return { bitmap: out, dirtyPages: dirty, pagesSynced: sync.pages, scanNs: sync.hostNs, pagesWriteProtected: dirty, tlbFlushed, hostNs, vcpusRan: run !== null };
}

/** Validates CLEAR's range as kvm_clear_dirty_log_protect does (first_page's alignment is checked before the slot lookup). */
function checkClearRange(slot: Memslot, firstPage: number, numPages: number, bitmapBytes: number): void {
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
function clearAndProtect(vm: Vm, slot: Memslot, firstPage: number, numPages: number, user: Int32Array, concurrent: boolean): ClearDirtyLogResult {
  const bm = slot.dirtyBitmap!;
  const c = vm.costs;
  // Seed 003: "omit dirty log sync in log clear if initially all set".
  const syncNs = vm.manualProtect && vm.initiallySet ? 0 : vm.arch.syncDirtyLog(vm, slot).hostNs;
  const firstWord = firstPage / 64;
  const words = Math.ceil(numPages / 64);
  let cleared = 0;
  let calls = 0;
  const protect = vm.arch.protectMasked(vm, slot, splitsInClear(vm));
  const perPage = c.clearPageWriteProtectNs;
  let run: GuestRunsThrough | null = null;
  const start = syncNs + c.ioctlNs;
  if (concurrent) {
    const n = census(bm, firstWord, words, user);
    run = GuestRunsThrough.start(vm, true, true, start + words * c.bitmapWordScanNs + n.calls * c.protectMaskedCallNs + n.pages * perPage + (n.pages > 0 ? c.tlbFlushNs : 0));
  }
  for (let k = 0; k < words; k++) {
    if (run && k % SYNC_CHUNK_WORDS === 0) run.at(start + k * c.bitmapWordScanNs + calls * c.protectMaskedCallNs + cleared * perPage);
    const w = firstWord + k;
    const lo = user[2 * k] & bm[2 * w];
    const hi = user[2 * k + 1] & bm[2 * w + 1];
    if ((lo | hi) === 0) continue;
    calls++;
    bm[2 * w] &= ~lo;
    bm[2 * w + 1] &= ~hi;
    cleared += popcount32(lo) + popcount32(hi);
    protect.mask(w * 64, lo, hi);
  }
  const splitUnits = protect.done();
  run?.at(start + words * c.bitmapWordScanNs + calls * c.protectMaskedCallNs + cleared * perPage);
  const tlbFlushed = cleared > 0 && vm.flushTlbsAfterWriteProtect();
  const hostNs =
    syncNs +
    c.ioctlNs +
    words * c.bitmapWordScanNs +
    calls * c.protectMaskedCallNs +
    cleared * c.clearPageWriteProtectNs +
    splitUnits * c.splitBlockNs +
    (tlbFlushed ? c.tlbFlushNs : 0);
  run?.end(hostNs);
  return { pagesCleared: cleared, tlbFlushed, hostNs, vcpusRan: run !== null };
}

/**
 * LOG_DIRTY_PAGES turned on (kvm_alloc_dirty_bitmap, kvm_mmu_slot_apply_flags):
 * allocate the bitmap (with a ring, only WITH_BITMAP's backup bitmap); with
 * INITIALLY_SET it starts all ones and nothing is protected (CLEAR arms
 * protection piece by piece); otherwise write-protect the whole slot, split
 * its blocks when eager splitting is on, and flush. Returns host ns.
 */
export function enableLogging(vm: Vm, slot: Memslot): number {
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
  // Write protection walks the mapped leaf entries: a block is one entry (eager splitting then splits it), an unmapped page none.
  const entries = mappedEntries(slot);
  const walk = loggingWalk(vm, slot);
  vm.arch.protectSlot(vm, slot);
  const units = vm.arch.eagerSplit(vm) ? slot.s2.splitRange(0, slot.npages) : 0;
  const flushed = vm.flushTlbsAfterWriteProtect();
  return walk + entries * c.enableLoggingPageNs + units * c.splitBlockNs + (flushed ? c.tlbFlushNs : 0);
}

/** What toggling logging pays to walk the slot: every page (the shadow MMU's rmaps), and a cache miss per line of mapped entries. */
function loggingWalk(vm: Vm, slot: Memslot): number {
  const c = vm.costs;
  return slot.npages * c.loggingWalkPageNs + (c.loggingEntryLineNs > 0 ? slot.s2.entryLines * c.loggingEntryLineNs : 0);
}

/** The slot's mapped leaf entries: 4 KiB pages and blocks. */
function mappedEntries(slot: Memslot): number {
  return slot.s2.pages4k + slot.s2.blocks2m + slot.s2.blocks1g;
}

/**
 * LOG_DIRTY_PAGES turned off: the bitmap goes, and the architecture may zap
 * the 4 KiB leaves of ranges a block can map again, so that faults rebuild
 * the blocks (x86); what stays mapped stays split. The walk is over mapped entries.
 */
export function disableLogging(vm: Vm, slot: Memslot): number {
  slot.dirtyBitmap = null;
  slot.ringPending = null;
  const c = vm.costs;
  const walked = loggingWalk(vm, slot) + mappedEntries(slot) * c.disableLoggingPageNs;
  const zapped = vm.arch.recoverHugePages(vm, slot);
  return walked + zapped * c.collapseZapEntryNs + (zapped > 0 && vm.flushTlbsAfterWriteProtect() ? c.tlbFlushNs : 0);
}
