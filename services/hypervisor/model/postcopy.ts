/**
 * Post-copy on the destination, as QEMU runs it over userfaultfd
 * (migration/postcopy-ram.c): at the switch the pages the source still had
 * dirty are missing here; a vCPU access to one faults, raises a page request
 * (one per page, as postcopy_request_page dedups) and waits until the page
 * lands; pages land at the guest time the sender says (its link's time); a
 * page that lands where one is already present is dropped (UFFDIO_COPY's
 * EEXIST), so a late copy never overwrites what the guest wrote since.
 * Blocktime is QEMU's postcopy-blocktime: per vCPU the time it waited, and
 * for the VM the time during which every running vCPU waited at once.
 *
 * Pages are modelled at 4 KiB: userfaultfd resolves a huge page as a whole,
 * so VMs with huge backing are refused.
 */
import { failedPrecondition, invalidArgument } from "../../../common/errors.js";
import type { Memslot } from "./memslot.js";
import type { Vcpu } from "./vcpu.js";
import { WorkloadGen } from "./workload.js";

/** arrival[] of a page that is here: it never left, or it has landed. */
const PRESENT = -1;
/** arrival[] of a page that is missing and not on its way. */
const UNSENT = Infinity;

export interface PageRequest {
  sequence: number;
  slot: number;
  page: number;
  gpa: number;
  vcpu: number;
  atNs: number;
}

/** A vCPU waiting for a page that nobody has sent yet. */
interface Wait {
  slot: number;
  page: number;
  since: number;
}

/** A vCPU's reads in post-copy: its own generator over its workload's pattern, at readsPerSecond. */
export interface ReadStream {
  gen: WorkloadGen;
  intervalNs: number;
  nextAt: number;
}

export class Postcopy {
  /** Per slot: the guest time each page lands (PRESENT, a time, or UNSENT). */
  readonly arrival = new Map<number, Float64Array>();
  /** Pages not sent yet, and the time the last sent one lands. */
  unsent = 0;
  lastArrivalNs = 0;
  readonly requests: PageRequest[] = [];
  private readonly requested = new Set<number>();
  /** Copies that landed on a page already here (dropped). */
  duplicates = 0;
  /** Guest time every running vCPU waited at once (postcopy-blocktime), and each vCPU's wait (postcopy-vcpu-blocktime). */
  blocktimeNs = 0;
  readonly vcpuBlocktimeNs: Float64Array;
  readonly waits: (Wait | null)[];
  readonly reads: (ReadStream | null)[];
  /** Each vCPU's waits not yet counted into blocktimeNs, as [from, to) pairs. */
  private readonly intervals: number[][];
  private readonly listeners = new Set<(r: PageRequest) => void>();

  constructor(
    slots: Iterable<Memslot>,
    missing: Map<number, Uint8Array>,
    readonly vcpuCount: number,
    reads: (ReadStream | null)[],
  ) {
    for (const s of slots) {
      const a = new Float64Array(s.npages).fill(PRESENT);
      const bm = missing.get(s.id);
      if (bm) {
        for (let p = 0; p < s.npages; p++) {
          if ((bm[p >>> 3] >> (p & 7)) & 1) {
            a[p] = UNSENT;
            this.unsent++;
          }
        }
      }
      this.arrival.set(s.id, a);
    }
    this.vcpuBlocktimeNs = new Float64Array(vcpuCount);
    this.waits = new Array<Wait | null>(vcpuCount).fill(null);
    this.reads = reads;
    this.intervals = Array.from({ length: vcpuCount }, () => []);
  }

  /** Bytes these arrays take: 8 per page. */
  static bytesFor(pages: number): number {
    return pages * 8;
  }

  get allocatedBytes(): number {
    let n = 0;
    for (const a of this.arrival.values()) n += a.byteLength;
    return n;
  }

  /** Every page has landed by guest time t: post-copy is over. */
  doneBy(t: number): boolean {
    return this.unsent === 0 && t >= this.lastArrivalNs;
  }

  /** Guest time page p of slot lands (PRESENT: here; Infinity: not sent). */
  arrivalOf(slot: number, p: number): number {
    return this.arrival.get(slot)![p];
  }

  /**
   * The sender's copy of page p lands at guest time at. Returns whether it
   * is taken: a page already here drops it, a page already on its way lands
   * at the earlier of the two times.
   */
  land(slot: number, p: number, at: number): boolean {
    const a = this.arrival.get(slot)!;
    const was = a[p];
    if (was === PRESENT) {
      this.duplicates++;
      return false;
    }
    if (was === UNSENT) this.unsent--;
    else this.duplicates++;
    a[p] = Math.min(was, at);
    if (a[p] > this.lastArrivalNs) this.lastArrivalNs = a[p];
    return was === UNSENT;
  }

  /**
   * vCPU v touches page p (gpa) at guest time t and it is not here. Returns
   * the time it can go on (when the page lands), or Infinity: it waits for a
   * page nobody has sent, and a page request goes out.
   */
  fault(v: Vcpu, slot: Memslot, p: number, gpa: number, t: number): number {
    const at = this.arrival.get(slot.id)![p];
    if (at !== UNSENT) {
      this.waited(v.index, t, at);
      return at;
    }
    this.waits[v.index] = { slot: slot.id, page: p, since: t };
    const key = slot.id * 2 ** 32 + p;
    if (!this.requested.has(key)) {
      this.requested.add(key);
      const r: PageRequest = { sequence: this.requests.length + 1, slot: slot.id, page: p, gpa, vcpu: v.index, atNs: t };
      this.requests.push(r);
      for (const l of this.listeners) l(r);
    }
    return Infinity;
  }

  private waited(vcpu: number, from: number, to: number): void {
    if (to <= from) return;
    this.vcpuBlocktimeNs[vcpu] += to - from;
    this.intervals[vcpu].push(from, to);
  }

  /** The start of a quantum [t, tq): vCPUs whose page lands before tq go on when it does. */
  beginQuantum(vcpus: readonly Vcpu[], t: number, tq: number): void {
    for (const v of vcpus) {
      const w = this.waits[v.index];
      if (!w) continue;
      const at = this.arrival.get(w.slot)![w.page];
      if (at >= tq) continue;
      const wake = Math.max(at, t);
      this.waited(v.index, Math.max(w.since, t), wake);
      this.waits[v.index] = null;
      v.time = Math.max(v.time, wake);
    }
  }

  /** The end of a quantum: the time in it during which every running vCPU waited counts as blocktime. */
  endQuantum(vcpus: readonly Vcpu[], t: number, tq: number): void {
    for (const v of vcpus) {
      const w = this.waits[v.index];
      if (w) this.waited(v.index, Math.max(w.since, t), tq);
    }
    const running = vcpus.filter((v) => !v.paused);
    if (running.length > 0 && running.every((v) => this.intervals[v.index].length > 0)) {
      // Intersect the running vCPUs' waits within [t, tq).
      let common: number[] = [t, tq];
      for (const v of running) common = intersect(common, this.intervals[v.index]);
      for (let i = 0; i < common.length; i += 2) this.blocktimeNs += common[i + 1] - common[i];
    }
    // Keep only what reaches past this quantum.
    for (const v of vcpus) {
      const iv = this.intervals[v.index];
      const keep: number[] = [];
      for (let i = 0; i < iv.length; i += 2) if (iv[i + 1] > tq) keep.push(Math.max(iv[i], tq), iv[i + 1]);
      this.intervals[v.index] = keep;
    }
  }

  /** Calls listener with every request from sequence `from` on, and then as they are raised; returns the unsubscribe. */
  watch(from: number, listener: (r: PageRequest) => void): () => void {
    for (const r of this.requests.slice(Math.max(0, from - 1))) listener(r);
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }
}

/** The parts of two sorted lists of [from, to) pairs that both cover. */
function intersect(a: number[], b: number[]): number[] {
  const out: number[] = [];
  for (let i = 0; i < a.length; i += 2) {
    for (let j = 0; j < b.length; j += 2) {
      const lo = Math.max(a[i], b[j]);
      const hi = Math.min(a[i + 1], b[j + 1]);
      if (hi > lo) out.push(lo, hi);
    }
  }
  return out.length > 2 ? merge(out) : out;
}

function merge(pairs: number[]): number[] {
  const spans: [number, number][] = [];
  for (let i = 0; i < pairs.length; i += 2) spans.push([pairs[i], pairs[i + 1]]);
  spans.sort((x, y) => x[0] - y[0]);
  const out: number[] = [];
  for (const [lo, hi] of spans) {
    if (out.length && lo <= out[out.length - 1]) out[out.length - 1] = Math.max(out[out.length - 1], hi);
    else out.push(lo, hi);
  }
  return out;
}

/** Checks a StartPostcopy: the missing bitmaps against the VM's slots. */
export function missingBitmaps(slots: Map<number, Memslot>, given: { slot: number; bitmap: Uint8Array }[]): Map<number, Uint8Array> {
  const out = new Map<number, Uint8Array>();
  for (const g of given) {
    const s = slots.get(g.slot);
    if (!s) throw invalidArgument(`start postcopy: no slot ${g.slot}`, "ENOENT");
    if (g.bitmap.byteLength < Math.ceil(s.npages / 8)) throw invalidArgument(`start postcopy: slot ${g.slot}'s bitmap has ${g.bitmap.byteLength} bytes for ${s.npages} pages`);
    if (out.has(g.slot)) throw invalidArgument(`start postcopy: slot ${g.slot} is given twice`);
    out.set(g.slot, g.bitmap);
  }
  return out;
}

export function refusePostcopy(why: string): never {
  throw failedPrecondition(`start postcopy: ${why}`);
}
