/**
 * A memslot: a range of guest physical memory with its backing contents, its
 * stage-2 descriptors, and its dirty bitmap while logging. Per-page state
 * lives in typed arrays: 8 bytes of content and 8 of descriptor per page, plus
 * one bit of dirty log.
 */
import { Stage2 } from "./stage2.js";

export const KVM_MEM_LOG_DIRTY_PAGES = 1 << 0;
export const KVM_MEM_READONLY = 1 << 1;
export const KNOWN_FLAGS = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY;
/** KVM_MEM_MAX_NR_PAGES: (1 << 31) - 1. */
export const MAX_SLOT_PAGES = 2 ** 31 - 1;
/** arm64 has one address space and no internal slots: KVM_USER_MEM_SLOTS = SHRT_MAX. */
export const USER_MEM_SLOTS = 32767;

export class Memslot {
  readonly npages: number;
  readonly baseGfn: number;
  /** Content word of every page, lo/hi interleaved (little-endian u64 in the buffer). */
  readonly content: Uint32Array;
  readonly s2: Stage2;
  /**
   * The dirty bitmap while LOG_DIRTY_PAGES is on (with a dirty ring, only
   * WITH_BITMAP's backup bitmap): one bit per page, 64-bit words as lo/hi pairs.
   */
  dirtyBitmap: Int32Array | null = null;
  /**
   * With a dirty ring: pages pushed to a ring and not yet reset. A page is
   * pushed once until its entry is reset; write protection ensures that for
   * ordinary pages, this also covers write-tracked pages, whose writes are
   * emulated and never make the page writable.
   */
  ringPending: Int32Array | null = null;
  /** Pages whose dirty-log bit went from 0 to 1 (the dirty-rate counter). */
  pagesDirtied = 0;

  constructor(
    readonly id: number,
    readonly gpa: number,
    readonly size: number,
    public flags: number,
    hostBase: number,
  ) {
    this.npages = size / 4096;
    this.baseGfn = gpa / 4096;
    this.content = new Uint32Array(2 * this.npages);
    this.s2 = new Stage2(this.baseGfn, this.npages, hostBase);
  }

  get readonly(): boolean {
    return (this.flags & KVM_MEM_READONLY) !== 0;
  }
  get logging(): boolean {
    return (this.flags & KVM_MEM_LOG_DIRTY_PAGES) !== 0;
  }
  get endGpa(): number {
    return this.gpa + this.size;
  }
  /** Bytes of the dirty bitmap: ALIGN(npages, 64) / 8. */
  get bitmapBytes(): number {
    return Math.ceil(this.npages / 64) * 8;
  }

  /** Bytes of this slot's typed arrays: contents, descriptors, the walk cache, the logs. */
  get allocatedBytes(): number {
    return this.content.byteLength + this.s2.allocatedBytes + (this.dirtyBitmap?.byteLength ?? 0) + (this.ringPending?.byteLength ?? 0);
  }

  /** allocatedBytes of a slot at gpa of size bytes with these flags, before it exists. */
  static bytesFor(gpa: number, size: number, flags: number, ring: boolean, withBitmap: boolean): number {
    const npages = size / 4096;
    return 8 * npages + Stage2.bytesFor(gpa / 4096, npages) + (flags & KVM_MEM_LOG_DIRTY_PAGES ? Memslot.loggingBytesFor(npages, ring, withBitmap) : 0);
  }

  /** What turning LOG_DIRTY_PAGES on allocates: the bitmap (with a ring, the pending bits and WITH_BITMAP's bitmap). */
  static loggingBytesFor(npages: number, ring: boolean, withBitmap: boolean): number {
    return 8 * Math.ceil(npages / 64) * ((ring ? 1 : 0) + (!ring || withBitmap ? 1 : 0));
  }

  containsGfn(gfn: number): boolean {
    return gfn >= this.baseGfn && gfn < this.baseGfn + this.npages;
  }

  /** Sets page p's bit in the dirty log; true when it was clear. */
  markDirty(p: number): boolean {
    const bm = this.dirtyBitmap;
    if (!bm) return false;
    const w = p >>> 5;
    const bit = 1 << (p & 31);
    if (bm[w] & bit) return false;
    bm[w] |= bit;
    this.pagesDirtied++;
    return true;
  }

  /** Marks page p pushed to a ring; false when it already was (its entry not reset yet). */
  markRingPending(p: number): boolean {
    const rp = this.ringPending!;
    const bit = 1 << (p & 31);
    if (rp[p >>> 5] & bit) return false;
    rp[p >>> 5] |= bit;
    this.pagesDirtied++;
    return true;
  }

  contentAt(p: number): bigint {
    return (BigInt(this.content[2 * p + 1]) << 32n) | BigInt(this.content[2 * p]);
  }
}

