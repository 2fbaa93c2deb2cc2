/** Bit counting on 32-bit words, for bitmaps kept as Int32Arrays. */

export function popcount32(x: number): number {
  x -= (x >>> 1) & 0x55555555;
  x = (x & 0x33333333) + ((x >>> 2) & 0x33333333);
  return (((x + (x >>> 4)) & 0x0f0f0f0f) * 0x01010101) >>> 24;
}

/** The index of the lowest set bit (x must not be 0). */
export const ctz32 = (x: number) => 31 - Math.clz32(x & -x);
