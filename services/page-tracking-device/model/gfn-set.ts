/**
 * A set of guest frame numbers: an open-addressing hash table (linear
 * probing, backward-shift deletion) in one Float64Array. Its memory follows
 * what it holds, 16 to 32 bytes per GFN however sparse the GFNs are (a bitmap
 * pays for the address space instead: 128 KiB for one GFN in a new 4 GiB
 * region). Add, has and delete allocate nothing but the table's doublings.
 */
const EMPTY = 0;
const MIN_SLOTS = 64;

export class GfnSet {
  /** gfn + 1 per slot; 0 marks an empty slot. */
  private keys = new Float64Array(MIN_SLOTS);
  private mask = MIN_SLOTS - 1;
  size = 0;

  get allocatedBytes(): number {
    return this.keys.byteLength;
  }

  /** Fibonacci hashing of both 26-bit halves of a GFN below 2^52. */
  private home(key: number): number {
    const lo = key % 67108864;
    const hi = (key - lo) / 67108864;
    return (Math.imul(lo ^ Math.imul(hi, 0x85ebca6b), 0x9e3779b1) >>> 0) & this.mask;
  }

  private find(key: number): number {
    const keys = this.keys;
    for (let i = this.home(key); ; i = (i + 1) & this.mask) {
      const k = keys[i];
      if (k === key || k === EMPTY) return i;
    }
  }

  /** Adds gfn; false when it was there already. */
  add(gfn: number): boolean {
    const key = gfn + 1;
    const i = this.find(key);
    if (this.keys[i] === key) return false;
    this.keys[i] = key;
    if (++this.size * 2 > this.keys.length) this.resize(this.keys.length * 2);
    return true;
  }

  has(gfn: number): boolean {
    const key = gfn + 1;
    return this.keys[this.find(key)] === key;
  }

  delete(gfn: number): void {
    const key = gfn + 1;
    const keys = this.keys;
    let hole = this.find(key);
    if (keys[hole] !== key) return;
    // Backward shift: move up each later entry of the run that may live in the hole.
    for (let j = (hole + 1) & this.mask; keys[j] !== EMPTY; j = (j + 1) & this.mask) {
      const h = this.home(keys[j]);
      if (((j - h) & this.mask) >= ((j - hole) & this.mask)) {
        keys[hole] = keys[j];
        hole = j;
      }
    }
    keys[hole] = EMPTY;
    this.size--;
    if (this.size * 8 < keys.length && keys.length > MIN_SLOTS) this.resize(keys.length / 2);
  }

  private resize(slots: number): void {
    const old = this.keys;
    this.keys = new Float64Array(slots);
    this.mask = slots - 1;
    for (let i = 0; i < old.length; i++) if (old[i] !== EMPTY) this.keys[this.find(old[i])] = old[i];
  }
}
