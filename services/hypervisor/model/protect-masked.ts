/**
 * The two ways an architecture re-arms logging for a mask of pages
 * (kvm_arch_mmu_enable_log_dirty_pt_masked), as walks of the stage-2 / EPT
 * table. Both merge the ranges of adjacent words into one walk: the pages
 * protected are the same, the walk is shorter. With setDbm, writable pages
 * become writable-clean instead of read-only (arm64 DBM, x86 PML's cleared D
 * bit); blocks lose write permission either way. Eager splitting happens
 * here only when the log started all set; otherwise it already happened at
 * enable.
 */
import type { MaskedProtect } from "./arch.js";
import { ctz32 } from "./bits.js";
import type { Memslot } from "./memslot.js";

abstract class RunProtect implements MaskedProtect {
  private start = -1;
  private end = -1;
  private splitUnits = 0;

  constructor(
    private readonly slot: Memslot,
    private readonly split: boolean,
    private readonly setDbm: boolean,
  ) {}

  abstract mask(first: number, lo: number, hi: number): void;

  /** Pages [a, b) are to be protected; adjacent runs merge. */
  protected run(a: number, b: number): void {
    if (a === this.end) {
      this.end = b;
      return;
    }
    this.walk();
    this.start = a;
    this.end = b;
  }

  done(): number {
    this.walk();
    return this.splitUnits;
  }

  private walk(): void {
    if (this.start < 0) return;
    this.slot.s2.writeProtectRange(this.start, this.end, this.setDbm);
    if (this.split) this.splitUnits += this.slot.s2.splitRange(this.start, this.end);
    this.start = this.end = -1;
  }
}

/**
 * arm64's kvm_mmu_write_protect_pt_masked: one stage2_wp_range from the
 * mask's lowest set page to its highest, pages between them included.
 */
export class SpanProtect extends RunProtect {
  mask(base: number, lo: number, hi: number): void {
    const first = base + (lo !== 0 ? ctz32(lo) : 32 + ctz32(hi));
    const last = base + (hi !== 0 ? 63 - Math.clz32(hi) : 31 - Math.clz32(lo));
    this.run(first, last + 1);
  }
}

/**
 * Exactly the mask's pages: x86's rmap and TDP MMU walks visit each set bit
 * (kvm_mmu_write_protect_pt_masked, kvm_mmu_clear_dirty_pt_masked), and
 * arm64 with DBM's descriptor scan must too: there the descriptors are the
 * log, a page between ffs and fls of the mask but outside it may be
 * writable-dirty in hardware and not yet in the bitmap (CLEAR skips the sync
 * when the log started all set), and protecting it erases that
 * (`bitmap+initially-set+dbm` migrations lost pages). Whether seed 003's
 * write-protect walk saves such pages is not in our references.
 */
export class ExactProtect extends RunProtect {
  mask(base: number, lo: number, hi: number): void {
    this.half(base, lo);
    this.half(base + 32, hi);
  }

  private half(base: number, m: number): void {
    while (m !== 0) {
      const s = ctz32(m);
      const ones = ~(m >>> s);
      const len = ones === 0 ? 32 : Math.min(ctz32(ones), 32 - s);
      this.run(base + s, base + s + len);
      m = s + len >= 32 ? 0 : m & ~(((1 << len) - 1) << s);
    }
  }
}
