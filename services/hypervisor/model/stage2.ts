/**
 * The stage-2 translation table of one memslot's range: level-1 (1 GiB),
 * level-2 (2 MiB) and level-3 (4 KiB) descriptors in flat typed arrays
 * (structure of arrays, 8 bytes per guest page at level 3).
 *
 * Invariant: a level-3 descriptor is valid only when its level-2 and level-1
 * entries are tables, and a block's subordinate entries are all zero. The walk
 * may therefore read the level-3 entry first: when it is valid it is the leaf
 * a top-down walk would reach.
 *
 * Blocks are only ever installed for 2 MiB / 1 GiB regions lying wholly inside
 * the slot (as KVM requires); edge regions are tables or empty.
 */
import {
  PAGE_RO,
  PAGES_1G,
  PAGES_2M,
  PAGE_SIZE,
  S2AP_W,
  TABLE,
  VALID,
  TABLE_OR_PAGE,
  descHi,
  descLo,
} from "./descriptor.js";

export enum Level {
  Unmapped = 0,
  Block1G = 1,
  Block2M = 2,
  Page = 3,
}

const NOT_W = ~S2AP_W;

export class Stage2 {
  /** Level-3 descriptors, lo/hi interleaved, indexed by page of the slot. */
  readonly pte: Uint32Array;
  /** Level-2 entries of the 2 MiB regions the slot overlaps. */
  readonly pmd: Uint32Array;
  /** Level-1 entries of the 1 GiB regions the slot overlaps. */
  readonly pud: Uint32Array;
  /** Index of the slot's first 2 MiB / 1 GiB region in the IPA space. */
  private readonly r2Base: number;
  private readonly r1Base: number;
  pages4k = 0;
  blocks2m = 0;
  blocks1g = 0;

  constructor(
    readonly baseGfn: number,
    readonly npages: number,
    /** Host physical address backing the slot's first page. */
    readonly hostBase: number,
  ) {
    this.pte = new Uint32Array(2 * npages);
    this.r2Base = Math.floor(baseGfn / PAGES_2M);
    this.r1Base = Math.floor(baseGfn / PAGES_1G);
    const last = baseGfn + npages - 1;
    this.pmd = new Uint32Array(2 * (Math.floor(last / PAGES_2M) - this.r2Base + 1));
    this.pud = new Uint32Array(2 * (Math.floor(last / PAGES_1G) - this.r1Base + 1));
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

  /** Can page p be mapped by a block of the given size (region wholly inside the slot)? */
  blockFits(p: number, pagesPerBlock: number): boolean {
    const start = Math.floor((this.baseGfn + p) / pagesPerBlock) * pagesPerBlock - this.baseGfn;
    return start >= 0 && start + pagesPerBlock <= this.npages;
  }

  /** The level of the leaf mapping page p. */
  leafLevel(p: number): Level {
    if (this.pte[2 * p] & VALID) return Level.Page;
    const l1 = this.pud[2 * this.i1(p)];
    if (l1 & VALID) {
      if (!(l1 & TABLE_OR_PAGE)) return Level.Block1G;
      const l2 = this.pmd[2 * this.i2(p)];
      if ((l2 & VALID) && !(l2 & TABLE_OR_PAGE)) return Level.Block2M;
    }
    return Level.Unmapped;
  }

  /** Array and index of page p's leaf descriptor (lo word at idx, hi at idx + 1). */
  leafRef(p: number, level: Level): [Uint32Array, number] {
    if (level === Level.Page) return [this.pte, 2 * p];
    if (level === Level.Block2M) return [this.pmd, 2 * this.i2(p)];
    return [this.pud, 2 * this.i1(p)];
  }

  private pageAddress(p: number): number {
    return this.hostBase + p * PAGE_SIZE;
  }

  /** Installs a level-3 page descriptor; parents must not be blocks. */
  mapPage(p: number, attrs: number, hiBits = 0): void {
    const i1 = 2 * this.i1(p);
    const i2 = 2 * this.i2(p);
    if (this.pud[i1] === 0) this.pud[i1] = TABLE;
    if (this.pmd[i2] === 0) this.pmd[i2] = TABLE;
    const pa = this.pageAddress(p);
    if (!(this.pte[2 * p] & VALID)) this.pages4k++;
    this.pte[2 * p] = descLo(pa, attrs);
    this.pte[2 * p + 1] = descHi(pa, hiBits);
  }

  /** Sets the attribute bits of page p's existing level-3 descriptor. */
  setPageAttrs(p: number, attrs: number): void {
    const lo = this.pte[2 * p];
    this.pte[2 * p] = ((lo & 0xfffff000) | attrs) >>> 0;
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
      this.pud[2 * i1] = descLo(this.pageAddress(first), attrs);
      this.pud[2 * i1 + 1] = descHi(this.pageAddress(first));
      this.blocks1g++;
    } else {
      const i1 = 2 * this.i1(p);
      if (this.pud[i1] === 0) this.pud[i1] = TABLE;
      const i2 = this.i2(p);
      const first = this.firstPageOf2m(i2);
      this.clearRange(first, first + PAGES_2M);
      this.pmd[2 * i2] = descLo(this.pageAddress(first), attrs);
      this.pmd[2 * i2 + 1] = descHi(this.pageAddress(first));
      this.blocks2m++;
    }
  }

  /** Zeroes every level-3 and level-2 entry under [p0, p1) (aligned to whole regions by the callers). */
  private clearRange(p0: number, p1: number): void {
    for (let p = p0; p < p1; p++) {
      if (this.pte[2 * p] & VALID) this.pages4k--;
      this.pte[2 * p] = 0;
      this.pte[2 * p + 1] = 0;
    }
    for (let i2 = this.i2(p0); i2 <= this.i2(p1 - 1); i2++) {
      const l2 = this.pmd[2 * i2];
      if ((l2 & VALID) && !(l2 & TABLE_OR_PAGE)) this.blocks2m--;
      this.pmd[2 * i2] = 0;
      this.pmd[2 * i2 + 1] = 0;
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
      const attrs = (this.pud[2 * i1] & 0xfff) | 0;
      this.pud[2 * i1] = TABLE;
      this.pud[2 * i1 + 1] = 0;
      this.blocks1g--;
      const first = this.firstPageOf1g(i1);
      if (fill) {
        for (let q = first; q < first + PAGES_1G; q += PAGES_2M) this.fillTable(q, attrs);
        return PAGES_1G / PAGES_2M;
      }
      return 1;
    }
    if (level === Level.Block2M) {
      const i2 = this.i2(p);
      const attrs = (this.pmd[2 * i2] & 0xfff) | 0;
      this.pmd[2 * i2] = TABLE;
      this.pmd[2 * i2 + 1] = 0;
      this.blocks2m--;
      if (fill) this.fillTable(this.firstPageOf2m(i2), attrs);
      return 1;
    }
    return 0;
  }

  private fillTable(first: number, blockAttrs: number): void {
    this.pmd[2 * this.i2(first)] = TABLE;
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
        p = Math.floor((this.baseGfn + p) / size) * size - this.baseGfn + size;
      } else {
        p = Math.floor((this.baseGfn + p) / PAGES_2M) * PAGES_2M - this.baseGfn + PAGES_2M;
      }
    }
    return units;
  }

  /**
   * Removes write permission from every leaf overlapping [p0, p1)
   * (stage2_wp_range). Blocks lose it whole.
   */
  writeProtectRange(p0: number, p1: number): void {
    const pte = this.pte;
    if (!this.hasBlocks) {
      for (let i = 2 * p0, end = 2 * p1; i < end; i += 2) pte[i] &= NOT_W;
      return;
    }
    for (let p = p0; p < p1; ) {
      const level = this.leafLevel(p);
      if (level === Level.Block1G || level === Level.Block2M) {
        const [arr, idx] = this.leafRef(p, level);
        arr[idx] &= NOT_W;
        const size = level === Level.Block1G ? PAGES_1G : PAGES_2M;
        p = Math.floor((this.baseGfn + p) / size) * size - this.baseGfn + size;
      } else {
        pte[2 * p] &= NOT_W;
        p++;
      }
    }
  }

  /** Removes write permission from every descriptor of the slot. */
  writeProtectAll(): void {
    this.writeProtectRange(0, this.npages);
  }
}

