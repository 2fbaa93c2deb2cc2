/**
 * A set of guest frame numbers as a two-level bitmap: 2^20 frames (4 GiB of
 * guest memory, 128 KiB of bits) per chunk, chunks made on first use. Add,
 * has and delete are a few integer operations, with no allocation per GFN.
 */
const CHUNK_BITS = 20;
const CHUNK = 1 << CHUNK_BITS;

export class GfnSet {
  private readonly chunks = new Map<number, Int32Array>();
  size = 0;

  private chunk(gfn: number, create: boolean): Int32Array | undefined {
    const k = Math.floor(gfn / CHUNK);
    let c = this.chunks.get(k);
    if (!c && create) this.chunks.set(k, (c = new Int32Array(CHUNK / 32)));
    return c;
  }

  /** Adds gfn; false when it was there already. */
  add(gfn: number): boolean {
    const c = this.chunk(gfn, true)!;
    const i = gfn & (CHUNK - 1);
    const bit = 1 << (i & 31);
    if (c[i >>> 5] & bit) return false;
    c[i >>> 5] |= bit;
    this.size++;
    return true;
  }

  has(gfn: number): boolean {
    const c = this.chunk(gfn, false);
    const i = gfn & (CHUNK - 1);
    return c !== undefined && (c[i >>> 5] & (1 << (i & 31))) !== 0;
  }

  delete(gfn: number): void {
    const c = this.chunk(gfn, false);
    if (!c) return;
    const i = gfn & (CHUNK - 1);
    const bit = 1 << (i & 31);
    if (c[i >>> 5] & bit) {
      c[i >>> 5] &= ~bit;
      this.size--;
    }
  }
}
