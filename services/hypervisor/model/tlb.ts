/**
 * A vCPU's TLB: direct-mapped, one entry per 4 KiB translation (block
 * mappings are cached splintered into page entries, as many cores do). Only
 * guest writes are simulated, so only writable translations are ever cached:
 * an entry holds the GFN it translates. A write that hits never consults the
 * descriptor: that is why write protection needs a TLB flush to take effect.
 */
const EMPTY = -1;

export class Tlb {
  readonly entries: Float64Array;
  readonly mask: number;

  constructor(readonly size: number) {
    this.entries = new Float64Array(size).fill(EMPTY);
    this.mask = size - 1;
  }

  fill(gfn: number): void {
    this.entries[gfn & this.mask] = gfn;
  }

  holds(gfn: number): boolean {
    return this.entries[gfn & this.mask] === gfn;
  }

  invalidatePage(gfn: number): void {
    const i = gfn & this.mask;
    if (this.entries[i] === gfn) this.entries[i] = EMPTY;
  }

  /** Invalidates [gfn, gfn + n); past the TLB's size a full flush does the same. */
  invalidateRange(gfn: number, n: number): void {
    if (n >= this.entries.length) return this.flush();
    for (let g = gfn; g < gfn + n; g++) this.invalidatePage(g);
  }

  flush(): void {
    this.entries.fill(EMPTY);
  }
}
