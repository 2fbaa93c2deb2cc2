/**
 * The migration link: a bandwidth and a latency. Pages travel as QEMU's RAM
 * stream sends them: an 8-byte header, then 4096 bytes for a normal page or
 * one byte for a zero page (QEMU's "duplicate" pages).
 */
export const PAGE_SIZE = 4096;
export const PAGE_HEADER_BYTES = 8;
export const NORMAL_PAGE_BYTES = PAGE_HEADER_BYTES + PAGE_SIZE;
export const ZERO_PAGE_BYTES = PAGE_HEADER_BYTES + 1;

export class Link {
  constructor(
    readonly bandwidthBitsPerSecond: number,
    readonly latencyNs: number,
  ) {
    if (!(bandwidthBitsPerSecond > 0)) throw new RangeError(`bandwidth must be > 0 bits/s (got ${bandwidthBitsPerSecond})`);
    if (!(latencyNs >= 0)) throw new RangeError(`latency must be >= 0 (got ${latencyNs})`);
  }

  get bytesPerSecond(): number {
    return this.bandwidthBitsPerSecond / 8;
  }

  /** Bytes on the wire for the given page counts. */
  static bytesFor(normalPages: number, zeroPages: number): number {
    return normalPages * NORMAL_PAGE_BYTES + zeroPages * ZERO_PAGE_BYTES;
  }

  /** Serialisation time of `bytes` on the link, without latency. */
  transmitNs(bytes: number): number {
    return (bytes * 8 * 1e9) / this.bandwidthBitsPerSecond;
  }
}
