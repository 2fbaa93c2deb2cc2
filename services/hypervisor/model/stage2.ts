/**
 * The stage-2 translation table of one memslot's range: level-1 (1 GiB),
 * level-2 (2 MiB) and level-3 (4 KiB) descriptors in flat typed arrays.
 *
 * Each level keeps its 64-bit descriptors as two planes, the low words
 * (valid, type, S2AP, AF, output address 31:12) and the high words (output
 * address 47:32, DBM at bit 51): 8 bytes per guest page at level 3. Write
 * protection and dirty-state scans only read or write the low plane, so they
 * stream half the memory.
 *
 * Invariant: a level-3 descriptor is valid only when its level-2 and level-1
 * entries are tables, and a block's subordinate entries are all zero. The walk
 * may therefore read the level-3 entry first: when it is valid it is the leaf
 * a top-down walk would reach.
 *
 * Blocks are only ever installed for 2 MiB / 1 GiB regions lying wholly inside
 * the slot (as KVM requires); edge regions are tables or empty.
 *
 * Beside the descriptors this class keeps `writable`, one bit per page that
 * mirrors "level-3 descriptor valid with S2AP_W" (a walk cache, as cores keep
 * for their own page tables). Every level-3 update goes through this class
 * and updates both; the guest write path reads the 2 MiB bit array instead of
 * the descriptors, so a random write costs one cache miss.
 */
import { popcount32 } from "./bits.js";
import { HI_DBM, PAGE_RO, PAGES_1G, PAGES_2M, PAGE_SIZE, S2AP_W, TABLE, VALID, TABLE_OR_PAGE, descHi, descLo } from "./descriptor.js";

export enum Level {
  Unmapped = 0,
  Block1G = 1,
  Block2M = 2,
  Page = 3,
}

/** One level's descriptors: low and high 32-bit words at the same index. */
export interface Plane {
  readonly lo: Int32Array;
  readonly hi: Int32Array;
}

const plane = (n: number): Plane => ({ lo: new Int32Array(n), hi: new Int32Array(n) });
const NOT_W = ~S2AP_W;
const S2AP_W_BIT = 31 - Math.clz32(S2AP_W);

export class Stage2 {
  /** Level-3 descriptors, indexed by page of the slot. */
  readonly pte: Plane;
  /** Level-2 entries of the 2 MiB regions the slot overlaps. */
  readonly pmd: Plane;
  /** Level-1 entries of the 1 GiB regions the slot overlaps. */
  readonly pud: Plane;
  /** Bit p set iff page p has a valid, writable level-3 descriptor. */
  readonly writable: Int32Array;
  /** Index of the slot's first 2 MiB / 1 GiB region in the IPA space. */
  private readonly r2Base: number;
  private readonly r1Base: number;
  pages4k = 0;
  blocks2m = 0;
  blocks1g = 0;
  /**
   * Called before a hardware-dirtied page descriptor (DBM with S2AP_W set) is
   * replaced or removed, so that its dirty state reaches the log (seed 003:
   * "we save the dirty status to underlying bitmap if dirty status is covered").
   */
  onDirtyLost: ((p: number) => void) | null = null;

  constructor(
    readonly baseGfn: number,
    readonly npages: number,
    /** Host physical address backing the slot's first page. */
    readonly hostBase: number,
  ) {
    this.pte = plane(npages);
    this.writable = new Int32Array(Math.ceil(npages / 32));
    this.r2Base = Math.floor(baseGfn / PAGES_2M);
    this.r1Base = Math.floor(baseGfn / PAGES_1G);
    const last = baseGfn + npages - 1;
    this.pmd = plane(Math.floor(last / PAGES_2M) - this.r2Base + 1);
    this.pud = plane(Math.floor(last / PAGES_1G) - this.r1Base + 1);
  }

  get allocatedBytes(): number {
    return [this.pte, this.pmd, this.pud].reduce((n, pl) => n + pl.lo.byteLength + pl.hi.byteLength, this.writable.byteLength);
  }

  /** allocatedBytes of a Stage2 for npages pages from baseGfn, before it exists. */
  static bytesFor(baseGfn: number, npages: number): number {
    const last = baseGfn + npages - 1;
    const n2 = Math.floor(last / PAGES_2M) - Math.floor(baseGfn / PAGES_2M) + 1;
    const n1 = Math.floor(last / PAGES_1G) - Math.floor(baseGfn / PAGES_1G) + 1;
    return 8 * (npages + n2 + n1) + 4 * Math.ceil(npages / 32);
  }

  /**
   * The 64-byte lines of leaf descriptors that hold a mapped entry: 8 page
   * descriptors share a line, a block's descriptor is one line of its own.
   * A walk that touches the mapped entries misses the cache once per line.
   */
  get entryLines(): number {
    const lo = this.pte.lo;
    let n = this.blocks2m + this.blocks1g;
    for (let p = 0; p < lo.length; p += 8) {
      const end = Math.min(p + 8, lo.length);
      for (let q = p; q < end; q++)
        if (lo[q] & VALID) {
          n++;
          break;
        }
    }
    return n;
  }

  /** Frees the (emptied) level-3 table of page p's 2 MiB region, as zapping its parent entry does. */
  dropTable(p: number): void {
    const i2 = this.i2(p);
    if ((this.pmd.lo[i2] & TABLE) === TABLE) {
      this.pmd.lo[i2] = 0;
      this.pmd.hi[i2] = 0;
    }
  }

  get hasBlocks(): boolean {
    return this.blocks2m + this.blocks1g > 0;
  }

  /** Level-2 entry index of page p. */
  i2(p: number): number {
    return Math.floor((this.baseGfn + p) / PAGES_2M) - this.r2Base;
  }
  i1(p: number): number {
    return Math.floor((this.baseGfn + p) / PAGES_1G) - this.r1Base;
  }
  /** First slot page of level-2 entry i2 (may be negative for an edge region). */
  private firstPageOf2m(i2: number): number {
    return (this.r2Base + i2) * PAGES_2M - this.baseGfn;
  }
  private firstPageOf1g(i1: number): number {
    return (this.r1Base + i1) * PAGES_1G - this.baseGfn;
  }
  /** First page past the block of the given size that contains page p. */
  private endOfBlock(p: number, pagesPerBlock: number): number {
    return Math.floor((this.baseGfn + p) / pagesPerBlock) * pagesPerBlock - this.baseGfn + pagesPerBlock;
  }

  /** Can page p be mapped by a block of the given size (region wholly inside the slot)? */
  blockFits(p: number, pagesPerBlock: number): boolean {
    const start = this.endOfBlock(p, pagesPerBlock) - pagesPerBlock;
    return start >= 0 && start + pagesPerBlock <= this.npages;
  }

  /** The level of the leaf mapping page p. */
  leafLevel(p: number): Level {
    if (this.pte.lo[p] & VALID) return Level.Page;
    const l1 = this.pud.lo[this.i1(p)];
    if (l1 & VALID) {
      if (!(l1 & TABLE_OR_PAGE)) return Level.Block1G;
      const l2 = this.pmd.lo[this.i2(p)];
      if (l2 & VALID && !(l2 & TABLE_OR_PAGE)) return Level.Block2M;
    }
    return Level.Unmapped;
  }

  /** The plane and index of page p's leaf descriptor at the given level. */
  leafRef(p: number, level: Level): [Plane, number] {
    if (level === Level.Page) return [this.pte, p];
    if (level === Level.Block2M) return [this.pmd, this.i2(p)];
    return [this.pud, this.i1(p)];
  }

  private pageAddress(p: number): number {
    return this.hostBase + p * PAGE_SIZE;
  }

  private mirror(p: number, attrs: number): void {
    if ((attrs & (VALID | S2AP_W)) === (VALID | S2AP_W)) this.writable[p >>> 5] |= 1 << (p & 31);
    else this.writable[p >>> 5] &= ~(1 << (p & 31));
  }

  /** Clears the writable mirror of pages [p0, p1). */
  private unmirrorRange(p0: number, p1: number): void {
    const w = this.writable;
    let p = p0;
    for (; p < p1 && p & 31; p++) w[p >>> 5] &= ~(1 << (p & 31));
    for (; p + 32 <= p1; p += 32) w[p >>> 5] = 0;
    for (; p < p1; p++) w[p >>> 5] &= ~(1 << (p & 31));
  }

  /** Installs a level-3 page descriptor; parents must not be blocks. */
  mapPage(p: number, attrs: number, hiBits = 0): void {
    const i1 = this.i1(p);
    const i2 = this.i2(p);
    if (this.pud.lo[i1] === 0) this.pud.lo[i1] = TABLE;
    if (this.pmd.lo[i2] === 0) this.pmd.lo[i2] = TABLE;
    const pa = this.pageAddress(p);
    if (!(this.pte.lo[p] & VALID)) this.pages4k++;
    else this.saveIfHwDirty(p);
    this.pte.lo[p] = descLo(pa, attrs);
    this.pte.hi[p] = descHi(pa, hiBits);
    this.mirror(p, attrs);
  }

  /** Sets the attribute bits of page p's existing level-3 descriptor. */
  setPageAttrs(p: number, attrs: number): void {
    this.pte.lo[p] = ((this.pte.lo[p] & 0xfffff000) | attrs) >>> 0;
    this.mirror(p, attrs);
  }

  /**
   * Installs a block covering page p, replacing whatever table was below it
   * (KVM coalesces back to a block on a fault once logging is off).
   */
  mapBlock(p: number, level: Level.Block2M | Level.Block1G, attrs: number): void {
    if (level === Level.Block1G) {
      const i1 = this.i1(p);
      const first = this.firstPageOf1g(i1);
      this.clearRange(first, first + PAGES_1G);
      this.pud.lo[i1] = descLo(this.pageAddress(first), attrs);
      this.pud.hi[i1] = descHi(this.pageAddress(first));
      this.blocks1g++;
    } else {
      const i1 = this.i1(p);
      if (this.pud.lo[i1] === 0) this.pud.lo[i1] = TABLE;
      const i2 = this.i2(p);
      const first = this.firstPageOf2m(i2);
      this.clearRange(first, first + PAGES_2M);
      this.pmd.lo[i2] = descLo(this.pageAddress(first), attrs);
      this.pmd.hi[i2] = descHi(this.pageAddress(first));
      this.blocks2m++;
    }
  }

  private saveIfHwDirty(p: number): void {
    if (this.pte.hi[p] & HI_DBM && this.pte.lo[p] & S2AP_W) this.onDirtyLost?.(p);
  }

  /** Zeroes every level-3 and level-2 entry under [p0, p1) (whole regions, from the callers). */
  private clearRange(p0: number, p1: number): void {
    this.unmirrorRange(p0, p1);
    const { lo, hi } = this.pte;
    for (let p = p0; p < p1; p++) {
      if (lo[p] & VALID) {
        this.pages4k--;
        this.saveIfHwDirty(p);
      }
      lo[p] = 0;
      hi[p] = 0;
    }
    for (let i2 = this.i2(p0); i2 <= this.i2(p1 - 1); i2++) {
      const l2 = this.pmd.lo[i2];
      if (l2 & VALID && !(l2 & TABLE_OR_PAGE)) this.blocks2m--;
      this.pmd.lo[i2] = 0;
      this.pmd.hi[i2] = 0;
    }
  }

  /**
   * Replaces the block mapping page p by a table. With fill, every page gets a
   * descriptor carrying the block's permissions (an eager split); without, the
   * table starts empty and the other pages fault back in one by one (KVM's
   * break-before-make when a fault needs a page inside a block).
   * Returns the number of 2 MiB units split.
   */
  splitBlockAt(p: number, fill: boolean): number {
    const level = this.leafLevel(p);
    if (level === Level.Block1G) {
      const i1 = this.i1(p);
      const attrs = this.pud.lo[i1] & 0xfff;
      this.pud.lo[i1] = TABLE;
      this.pud.hi[i1] = 0;
      this.blocks1g--;
      const first = this.firstPageOf1g(i1);
      if (!fill) return 1;
      for (let q = first; q < first + PAGES_1G; q += PAGES_2M) this.fillTable(q, attrs);
      return PAGES_1G / PAGES_2M;
    }
    if (level === Level.Block2M) {
      const i2 = this.i2(p);
      const attrs = this.pmd.lo[i2] & 0xfff;
      this.pmd.lo[i2] = TABLE;
      this.pmd.hi[i2] = 0;
      this.blocks2m--;
      if (fill) this.fillTable(this.firstPageOf2m(i2), attrs);
      return 1;
    }
    return 0;
  }

  private fillTable(first: number, blockAttrs: number): void {
    this.pmd.lo[this.i2(first)] = TABLE;
    const attrs = (blockAttrs | TABLE_OR_PAGE) & (PAGE_RO | S2AP_W);
    for (let q = first; q < first + PAGES_2M; q++) this.mapPage(q, attrs);
  }

  /** Eagerly splits every block overlapping [p0, p1) down to pages. Returns 2 MiB units split. */
  splitRange(p0: number, p1: number): number {
    if (!this.hasBlocks) return 0;
    let units = 0;
    for (let p = p0; p < p1; ) {
      const level = this.leafLevel(p);
      if (level === Level.Block1G || level === Level.Block2M) {
        const size = level === Level.Block1G ? PAGES_1G : PAGES_2M;
        units += this.splitBlockAt(p, true);
        p = this.endOfBlock(p, size);
      } else {
        p = this.endOfBlock(p, PAGES_2M);
      }
    }
    return units;
  }

  /**
   * Removes write permission from every leaf overlapping [p0, p1)
   * (stage2_wp_range). Blocks lose it whole. With setDbm (hardware dirty
   * logging on), pages that were writable get DBM first, so that they become
   * writable-clean: the next write sets S2AP_W in hardware, with no fault.
   */
  writeProtectRange(p0: number, p1: number, setDbm = false): void {
    const lo = this.pte.lo;
    if (setDbm) {
      const hi = this.pte.hi;
      const w = this.writable;
      for (let p = p0; p < p1; p++) if ((w[p >>> 5] >>> (p & 31)) & 1) hi[p] |= HI_DBM;
    }
    this.unmirrorRange(p0, p1);
    if (!this.hasBlocks) {
      for (let p = p0; p < p1; p++) lo[p] &= NOT_W;
      return;
    }
    for (let p = p0; p < p1; ) {
      const level = this.leafLevel(p);
      if (level === Level.Block1G || level === Level.Block2M) {
        const [pl, i] = this.leafRef(p, level);
        pl.lo[i] &= NOT_W;
        p = this.endOfBlock(p, level === Level.Block1G ? PAGES_1G : PAGES_2M);
      } else {
        lo[p] &= NOT_W;
        p++;
      }
    }
  }

  /** Removes write permission from every descriptor of the slot. */
  writeProtectAll(setDbm = false): void {
    this.writeProtectRange(0, this.npages, setDbm);
  }

  /** The hardware's clean -> dirty update of page p's descriptor (DBM set): S2AP_W goes on. */
  hwSetDirty(p: number): void {
    this.pte.lo[p] |= S2AP_W;
    this.writable[p >>> 5] |= 1 << (p & 31);
  }

  /**
   * The dirty-state scan of kvm_arch_sync_dirty_log with hardware DBM: every
   * page whose descriptor has S2AP_W set was written since it was last
   * protected (by hardware, or by a fault that logged it already), so its bit
   * goes into the log. It reads `writable`, the bit-sliced S2AP_W of every
   * level-3 descriptor, 64 times less memory than the descriptors. The bitmap
   * has the same word layout. Returns the bits newly set.
   */
  scanDirtyInto(bitmap: Int32Array): number {
    const w = this.writable;
    const n = w.length;
    let added = 0;
    for (let i = 0; i < n; i++) {
      const d = w[i] & ~bitmap[i];
      if (d !== 0) {
        bitmap[i] |= d;
        added += d === -1 ? 32 : popcount32(d);
      }
    }
    return added;
  }

  /**
   * The same scan reading the descriptors' low words (S2AP_W, bit 7), 32
   * pages to a bitmap word: the reference the benchmark compares with.
   */
  scanDescriptorsInto(bitmap: Int32Array): number {
    const lo = this.pte.lo;
    const n = this.npages;
    let added = 0;
    for (let i = 0, base = 0; base < n; i++, base += 32) {
      const end = Math.min(32, n - base);
      let m = 0;
      for (let k = 0; k < end; k++) m |= ((lo[base + k] >>> S2AP_W_BIT) & 1) << k;
      const d = m & ~bitmap[i];
      if (d === 0) continue;
      bitmap[i] |= d;
      added += d === -1 ? 32 : popcount32(d);
    }
    return added;
  }

  /** Clears DBM from every page descriptor (hardware dirty logging turned off). */
  clearDbmAll(): void {
    const hi = this.pte.hi;
    for (let p = 0; p < this.npages; p++) hi[p] &= ~HI_DBM;
  }

  /**
   * Unmaps every leaf overlapping [p0, p1) (kvm_unmap_gfn_range); a block
   * that overlaps goes whole. Hardware dirty state is saved first.
   */
  unmapRange(p0: number, p1: number): void {
    for (let p = p0; p < p1; ) {
      const level = this.leafLevel(p);
      if (level === Level.Block1G || level === Level.Block2M) {
        const size = level === Level.Block1G ? PAGES_1G : PAGES_2M;
        const [pl, i] = this.leafRef(p, level);
        pl.lo[i] = TABLE;
        pl.hi[i] = 0;
        if (level === Level.Block1G) this.blocks1g--;
        else this.blocks2m--;
        p = this.endOfBlock(p, size);
      } else {
        if (this.pte.lo[p] & VALID) {
          this.saveIfHwDirty(p);
          this.pages4k--;
          this.pte.lo[p] = 0;
          this.pte.hi[p] = 0;
          this.writable[p >>> 5] &= ~(1 << (p & 31));
        }
        p++;
      }
    }
  }
}
