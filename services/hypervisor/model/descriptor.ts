/**
 * arm64 stage-2 descriptor bits. A descriptor is 64 bits, kept as two 32-bit
 * words (lo = bits 0..31, hi = bits 32..63) so that hot paths never touch
 * BigInt. The words live in Int32Arrays: a load is always a small integer to
 * the JIT, where a Uint32Array load with bit 31 set becomes a double.
 */
export const VALID = 1 << 0;
/** At levels 1 and 2: a table (clear: a block). At level 3 it must be set for a page. */
export const TABLE_OR_PAGE = 1 << 1;
/** MemAttr[3:0] = 0b1111: Normal, inner and outer write-back. */
export const MEMATTR_NORMAL_WB = 0xf << 2;
export const S2AP_R = 1 << 6;
export const S2AP_W = 1 << 7;
/** SH[1:0] = 0b11: inner shareable. */
export const SH_INNER = 3 << 8;
export const AF = 1 << 10;
/** DBM is bit 51 of the descriptor: bit 19 of the high word. */
export const HI_DBM = 1 << (51 - 32);

export const LEAF_ATTRS = VALID | MEMATTR_NORMAL_WB | SH_INNER | AF | S2AP_R;
export const PAGE_RO = LEAF_ATTRS | TABLE_OR_PAGE;
export const PAGE_RW = PAGE_RO | S2AP_W;
export const BLOCK_RO = LEAF_ATTRS;
export const BLOCK_RW = LEAF_ATTRS | S2AP_W;
export const TABLE = VALID | TABLE_OR_PAGE;

export const PAGE_SHIFT = 12;
export const PAGE_SIZE = 4096;
/** 4 KiB pages per 2 MiB block and per 1 GiB block. */
export const PAGES_2M = 512;
export const PAGES_1G = 512 * 512;

const TWO32 = 4294967296;

/** Low word of a leaf descriptor with the output address and attributes. */
export function descLo(outputAddress: number, attrs: number): number {
  // ToUint32 (>>> 0) takes the address modulo 2^32 without a floating-point fmod.
  return (((outputAddress >>> 0) & 0xfffff000) | attrs) >>> 0;
}
export function descHi(outputAddress: number, hiBits = 0): number {
  return (Math.floor(outputAddress / TWO32) & 0xffff | hiBits) >>> 0;
}
export function outputAddressOf(lo: number, hi: number): number {
  return (hi & 0xffff) * TWO32 + ((lo & 0xfffff000) >>> 0);
}
export function toU64(lo: number, hi: number): bigint {
  return (BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0);
}
