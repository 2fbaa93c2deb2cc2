/**
 * A set of guest frame numbers: an open-addressing hash table (linear
 * probing, backward-shift deletion) of 64-frame groups, each entry a group
 * number and a 64-bit mask of its frames, in typed arrays. Memory follows what
 * it holds, at most 43 bytes per occupied group while it grows (so per GFN
 * however sparse the GFNs are, and under a byte per GFN when they cluster);
 * a bitmap pays for the address space instead (128 KiB for one GFN in a new
 * 4 GiB region). Clustered GFNs, the usual case, share a cache line.
 */
const MIN_SLOTS = 64;

export class GfnSet {
  /** Group number + 1 per slot; 0 marks an empty slot. */
  private keys = new Float64Array(MIN_SLOTS);
  /** The group's 64 frames, low and high 32 bits. */
  private lo = new Int32Array(MIN_SLOTS);
  private hi = new Int32Array(MIN_SLOTS);
  private shift = 32 - Math.log2(MIN_SLOTS);
  private groups = 0;
  /** GFNs held. */
  size = 0;

  get allocatedBytes(): number {
    return this.keys.byteLength + this.lo.byteLength + this.hi.byteLength;
  }

  /** Fibonacci hashing of both 32-bit halves of a key below 2^53, to the table's top bits. */
  private home(key: number): number {
    return Math.imul((key >>> 0) ^ Math.imul((key / 4294967296) | 0, 0x85ebca6b), 0x9e3779b1) >>> this.shift;
  }

  private find(key: number): number {
    const keys = this.keys;
    const mask = keys.length - 1;
    for (let i = this.home(key); ; i = (i + 1) & mask) {
      const k = keys[i];
      if (k === key || k === 0) return i;
    }
  }

  /** Adds gfn; false when it was there already. */
  add(gfn: number): boolean {
    const key = Math.floor(gfn / 64) + 1;
    const b = gfn & 63;
    const i = this.find(key);
    if (this.keys[i] === 0) {
      this.keys[i] = key;
      this.lo[i] = 0;
      this.hi[i] = 0;
      // At most three quarters full: between 21 and 43 bytes per occupied group.
      if (++this.groups * 4 > this.keys.length * 3) {
        this.resize(this.keys.length * 2);
        return this.add(gfn);
      }
    }
    if (b < 32) {
      if (this.lo[i] & (1 << b)) return false;
      this.lo[i] |= 1 << b;
    } else {
      if (this.hi[i] & (1 << (b - 32))) return false;
      this.hi[i] |= 1 << (b - 32);
    }
    this.size++;
    return true;
  }

  has(gfn: number): boolean {
    const key = Math.floor(gfn / 64) + 1;
    const i = this.find(key);
    if (this.keys[i] !== key) return false;
    const b = gfn & 63;
    return ((b < 32 ? this.lo[i] >>> b : this.hi[i] >>> (b - 32)) & 1) !== 0;
  }

  delete(gfn: number): void {
    const key = Math.floor(gfn / 64) + 1;
    const i = this.find(key);
    if (this.keys[i] !== key) return;
    const b = gfn & 63;
    const bit = 1 << (b & 31);
    const words = b < 32 ? this.lo : this.hi;
    if (!(words[i] & bit)) return;
    words[i] &= ~bit;
    this.size--;
    if ((this.lo[i] | this.hi[i]) === 0) this.removeAt(i);
  }

  /** Empties slot hole, moving up each later entry of the run that may live there. */
  private removeAt(hole: number): void {
    const { keys, lo, hi } = this;
    const mask = keys.length - 1;
    for (let j = (hole + 1) & mask; keys[j] !== 0; j = (j + 1) & mask) {
      const h = this.home(keys[j]);
      if (((j - h) & mask) >= ((j - hole) & mask)) {
        keys[hole] = keys[j];
        lo[hole] = lo[j];
        hi[hole] = hi[j];
        hole = j;
      }
    }
    keys[hole] = 0;
    if (--this.groups * 8 < keys.length && keys.length > MIN_SLOTS) this.resize(keys.length / 2);
  }

  private resize(slots: number): void {
    const { keys, lo, hi } = this;
    this.keys = new Float64Array(slots);
    this.lo = new Int32Array(slots);
    this.hi = new Int32Array(slots);
    this.shift = 32 - Math.log2(slots);
    for (let i = 0; i < keys.length; i++) {
      if (keys[i] === 0) continue;
      const j = this.find(keys[i]);
      this.keys[j] = keys[i];
      this.lo[j] = lo[i];
      this.hi[j] = hi[i];
    }
  }
}
