/**
 * The dirty-page trace file: what a VM dirtied, per interval and per vCPU,
 * compact enough to keep. Little-endian:
 *
 *   offset  size  field
 *   0       8     magic "DTTRACE\0"
 *   8       2     version (1)
 *   10      2     flags: bit 0 set = per VM (recorded from the dirty bitmap:
 *                 one record per interval holding every vCPU's pages)
 *   12      4     vCPUs (records per interval; 1 when per VM)
 *   16      8     interval, ns of guest time
 *   24      4     intervals
 *   28      4     reserved, 0
 *   32      8     the guest's writable pages (a replay needs at least as many)
 *   40      ...   records, interval by interval, vCPU by vCPU: a count n, then
 *                 n pages, increasing, each written as its gap from the one
 *                 before minus 1 (the first: the page itself); every number an
 *                 unsigned LEB128 varint. The file ends with the last record.
 *
 * Pages are indices into the VM's writable pages taken in slot order, as a
 * workload's working set counts them.
 */
export const TRACE_MAGIC = "DTTRACE\0";
export const TRACE_VERSION = 1;
const HEADER_BYTES = 40;
const FLAG_PER_VM = 1;

export interface TraceFile {
  /** Records per interval: the vCPUs, or 1 for a per-VM trace. */
  vcpus: number;
  perVm: boolean;
  intervalNs: number;
  guestPages: number;
  /** pages[k][v]: the pages vCPU v (or the VM) dirtied in interval k, increasing. */
  pages: Uint32Array[][];
}

/** A file that is not a trace, or not a whole one: where the first bad byte is, and why. */
export class TraceFormatError extends Error {
  constructor(
    readonly offset: number,
    why: string,
  ) {
    super(`at byte ${offset}: ${why}`);
  }
}

function varint(out: number[], n: number): void {
  while (n >= 0x80) {
    out.push((n & 0x7f) | 0x80);
    n = Math.floor(n / 128);
  }
  out.push(n);
}

export function encodeTrace(t: TraceFile): Uint8Array {
  const body: number[] = [];
  for (const interval of t.pages) {
    for (const pages of interval) {
      varint(body, pages.length);
      let prev = -1;
      for (const p of pages) {
        varint(body, p - prev - 1);
        prev = p;
      }
    }
  }
  const out = new Uint8Array(HEADER_BYTES + body.length);
  const dv = new DataView(out.buffer);
  for (let i = 0; i < 8; i++) out[i] = TRACE_MAGIC.charCodeAt(i);
  dv.setUint16(8, TRACE_VERSION, true);
  dv.setUint16(10, t.perVm ? FLAG_PER_VM : 0, true);
  dv.setUint32(12, t.vcpus, true);
  dv.setBigUint64(16, BigInt(t.intervalNs), true);
  dv.setUint32(24, t.pages.length, true);
  dv.setBigUint64(32, BigInt(t.guestPages), true);
  out.set(body, HEADER_BYTES);
  return out;
}

/** At most this many pages in a file (a replay holds them all: 64 MiB). */
export const MAX_FILE_PAGES = 16 * 2 ** 20;

export function decodeTrace(buf: Uint8Array): TraceFile {
  if (buf.byteLength < HEADER_BYTES) throw new TraceFormatError(buf.byteLength, `truncated: the header is ${HEADER_BYTES} bytes, the file ${buf.byteLength}`);
  for (let i = 0; i < 8; i++) if (buf[i] !== TRACE_MAGIC.charCodeAt(i)) throw new TraceFormatError(0, "not a dirty-page trace (no DTTRACE magic)");
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const version = dv.getUint16(8, true);
  if (version !== TRACE_VERSION) throw new TraceFormatError(8, `version ${version}; this reader knows ${TRACE_VERSION}`);
  const flags = dv.getUint16(10, true);
  if (flags & ~FLAG_PER_VM) throw new TraceFormatError(10, `unknown flags 0x${flags.toString(16)}`);
  const perVm = (flags & FLAG_PER_VM) !== 0;
  const vcpus = dv.getUint32(12, true);
  if (vcpus < 1 || vcpus > 512 || (perVm && vcpus !== 1)) throw new TraceFormatError(12, `${vcpus} vCPUs (1 to 512; 1 for a per-VM trace)`);
  const intervalNs = Number(dv.getBigUint64(16, true));
  if (!(intervalNs >= 1e6 && intervalNs <= 3600e9)) throw new TraceFormatError(16, `interval of ${intervalNs} ns (1 ms to 1 h)`);
  const intervals = dv.getUint32(24, true);
  if (intervals < 1) throw new TraceFormatError(24, "no intervals");
  if (dv.getUint32(28, true) !== 0) throw new TraceFormatError(28, "the reserved field is not 0");
  const guestPages = Number(dv.getBigUint64(32, true));
  if (!(guestPages >= 1 && guestPages <= 2 ** 32)) throw new TraceFormatError(32, `${guestPages} guest pages (1 to 2^32)`);

  let at = HEADER_BYTES;
  let total = 0;
  const read = (record: number, what: string): number => {
    let n = 0;
    let scale = 1;
    for (let i = 0; ; i++) {
      if (at >= buf.byteLength) throw new TraceFormatError(record, `truncated in ${what}`);
      if (i === 5) throw new TraceFormatError(record, `a varint of more than 5 bytes in ${what}`);
      const b = buf[at++];
      n += (b & 0x7f) * scale;
      scale *= 128;
      if (b < 0x80) return n;
    }
  };
  const pages: Uint32Array[][] = [];
  for (let k = 0; k < intervals; k++) {
    const row: Uint32Array[] = [];
    for (let v = 0; v < vcpus; v++) {
      const record = at;
      const where = `the record of interval ${k}, ${perVm ? "the VM" : `vCPU ${v}`}`;
      const n = read(record, where);
      total += n;
      if (total > MAX_FILE_PAGES) throw new TraceFormatError(record, `more than ${MAX_FILE_PAGES} pages in the file`);
      const out = new Uint32Array(n);
      let prev = -1;
      for (let i = 0; i < n; i++) {
        const p = prev + 1 + read(record, where);
        if (p >= guestPages) throw new TraceFormatError(record, `page ${p} in ${where} is past the guest's ${guestPages} pages`);
        out[i] = prev = p;
      }
      row.push(out);
    }
    pages.push(row);
  }
  if (at !== buf.byteLength) throw new TraceFormatError(at, `${buf.byteLength - at} bytes after the last record`);
  return { vcpus, perVm, intervalNs, guestPages, pages };
}

/** What each of `vcpus` vCPUs replays: its own records, or a per-VM trace's pages dealt out in turn. */
export function traceForVcpus(t: TraceFile, vcpus: number): { intervalNs: number; intervals: { pages: number[] }[] }[] {
  return Array.from({ length: vcpus }, (_, v) => ({
    intervalNs: t.intervalNs,
    intervals: t.pages.map((row) => ({ pages: t.perVm ? Array.from(row[0].filter((_, i) => i % vcpus === v)) : Array.from(row[v]) })),
  }));
}
