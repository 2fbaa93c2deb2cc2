/**
 * The data path: pages read from the source and written into the
 * destination, chunk by chunk, while the guest runs for each chunk's time on
 * the link.
 */
import type { MemoryChunk, VmInfo, WriteMemoryRequest } from "../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { Link, PAGE_SIZE } from "./link.js";
import { explain, interrupted, type MigrationRun, type Sent } from "./run.js";

export function popcount(bytes: Uint8Array, numPages: number): number {
  let n = 0;
  const full = numPages >>> 3;
  for (let i = 0; i < full; i++) {
    let b = bytes[i];
    while (b) {
      b &= b - 1;
      n++;
    }
  }
  for (let i = full * 8; i < numPages; i++) n += (bytes[i >>> 3] >> (i & 7)) & 1;
  return n;
}

function countZeroWords(contents: Uint8Array): number {
  const aligned = contents.byteOffset % 4 === 0 ? contents : new Uint8Array(contents);
  const w = new Int32Array(aligned.buffer, aligned.byteOffset, aligned.byteLength / 4);
  let zero = 0;
  for (let i = 0; i < w.length; i += 2) if ((w[i] | w[i + 1]) === 0) zero++;
  return zero;
}

export function orBitmaps(a: Map<number, Uint8Array>, b: Map<number, Uint8Array>): Map<number, Uint8Array> {
  const out = new Map<number, Uint8Array>();
  for (const [slot, x] of a) {
    const y = b.get(slot);
    const z = new Uint8Array(x);
    if (y) for (let i = 0; i < z.length; i++) z[i] |= y[i];
    out.set(slot, z);
  }
  return out;
}

/** A sync in the middle of a pass (fallback-sync.ts): due() syncs when it is time and returns what it found. */
export interface MidPassSync {
  due(): Promise<Map<number, Uint8Array> | null>;
  /** Where the pass has been: pages for the next round. */
  carry: Map<number, Uint8Array>;
}

/**
 * Merges a mid-pass sync into the pass: pages the pass has not reached yet
 * (slots after slotIndex, and pages of that slot from `from` on: a chunk
 * boundary, so a multiple of 64, or the slot's end) join its selection, the
 * rest wait in carry. Returns the pages that were not dirty already.
 */
function merge(select: Map<number, Uint8Array>, found: Map<number, Uint8Array>, carry: Map<number, Uint8Array>, order: number[], slotIndex: number, from: number): number {
  let added = 0;
  for (const [slot, bm] of found) {
    const sel = select.get(slot);
    if (!sel) continue;
    const at = order.indexOf(slot);
    const split = at < slotIndex ? bm.length : at > slotIndex ? 0 : Math.ceil(from / 8);
    let c = carry.get(slot);
    if (!c) carry.set(slot, (c = new Uint8Array(bm.length)));
    for (let i = 0; i < bm.length; i++) {
      const b = bm[i];
      if (b === 0) continue;
      const target = i < split ? c : sel;
      for (let x = b & ~target[i] & 0xff; x; x &= x - 1) added++;
      target[i] |= b;
    }
  }
  return added;
}

/**
 * The injected bug (injectSlotOffsetBug): a chunk of a slot after the first
 * whose selection leaves the slot's last page clean is written one page too
 * high. The selection's last bit is clear, so the shifted chunk still fits.
 */
function misplaced(chunk: MemoryChunk, slot: number, vm: VmInfo): MemoryChunk {
  const index = vm.memslots.findIndex((m) => m.memslot!.slot === slot);
  const pages = Number(vm.memslots[index].numPages);
  const first = Number(chunk.firstPage);
  const last = chunk.numPages - 1;
  const endsSlot = first + chunk.numPages === pages;
  const lastClean = chunk.bitmap.length > 0 && !((chunk.bitmap[last >>> 3] >> (last & 7)) & 1);
  if (index === 0 || !endsSlot || !lastClean) return chunk;
  return { ...chunk, firstPage: BigInt(first + 1), numPages: chunk.numPages - 1, bitmap: chunk.bitmap.subarray(0, Math.ceil((chunk.numPages - 1) / 8)) };
}

/**
 * Reads one chunk from the source and starts writing it into the
 * destination; returns its zero and normal pages and the pending write, which
 * overlaps the guest time the controller lets pass next. Chunks of a pass
 * are disjoint, so two writes may be in flight; a pass awaits all of its
 * writes before it ends, so a page re-sent in a later pass always lands last.
 */
async function copyChunk(run: MigrationRun, slot: number, first: number, count: number, sel: Uint8Array | null) {
  const { cfg, source, destination, bulk } = run;
  const chunks: WriteMemoryRequest[] = [];
  let zero = 0;
  let normal = 0;
  try {
    const stream = source.readMemory(
      {
        vm: cfg.sourceVm,
        slot,
        firstPage: BigInt(first),
        numPages: BigInt(count),
        bitmap: sel ? Buffer.from(sel.buffer, sel.byteOffset, sel.byteLength) : undefined,
        chunkPages: count,
      },
      bulk,
    );
    for await (const r of stream) {
      const z = countZeroWords(r.chunk!.contents);
      zero += z;
      normal += r.chunk!.contents.length / 8 - z;
      chunks.push({ vm: cfg.destinationVm, chunk: cfg.injectSlotOffsetBug ? misplaced(r.chunk!, slot, run.src) : r.chunk });
    }
  } catch (err) {
    interrupted(bulk.signal);
    throw explain(err, "source", source.address);
  }
  const written = run.on("destination", () => destination.writeMemory(chunks, bulk));
  written.catch(() => undefined); // awaited by the caller; this only keeps an early failure from going unhandled
  return { zero, normal, written };
}

/**
 * Sends the selected pages of every slot (select null: all pages), chunk by
 * chunk; the guest runs for each chunk's time on the link (and the host time
 * of its CLEAR, with manual protect), and the policies see the remaining
 * bytes fall as it passes. remainingBytes is what the pass starts with:
 * QEMU's ram.remaining (the dirty pages not yet sent) falls as each chunk
 * goes, and that is what KubeVirt's progress timeout watches.
 */
export async function sendPages(run: MigrationRun, select: Map<number, Uint8Array> | null, remainingBytes: number, midPass?: MidPassSync): Promise<Sent> {
  const { cfg, link, clock, tracker, report } = run;
  const out: Sent = { normal: 0, zero: 0, bytes: 0 };
  let pending: Promise<unknown> = Promise.resolve();
  for (const [slotIndex, s] of run.src.memslots.entries()) {
    const slot = s.memslot!.slot;
    const n = Number(s.numPages);
    const bitmap = select ? select.get(slot) : undefined;
    if (select && !bitmap) continue; // not logged (read-only): unchanged since round 0
    for (let first = 0; first < n; first += cfg.chunkPages) {
      const count = Math.min(cfg.chunkPages, n - first);
      const sel = bitmap ? bitmap.subarray(first >>> 3, (first + count + 7) >>> 3) : null;
      if (sel && popcount(sel, count) === 0) continue;
      const all = new Uint8Array(Math.ceil(count / 8)).fill(0xff);
      const hostNs = await run.on("source", () => tracker.beforeSend(slot, first, count, sel ?? all));
      const c = await copyChunk(run, slot, first, count, sel);
      await pending;
      pending = c.written;
      const bytes = Link.bytesFor(c.normal, c.zero);
      out.normal += c.normal;
      out.zero += c.zero;
      out.bytes += bytes;
      // Counted as each chunk goes, so that a pass that fails half-way reports what it sent.
      report.normalPages += c.normal;
      report.zeroPages += c.zero;
      report.transferredBytes += bytes;
      const chunkNs = hostNs + link.transmitNs(bytes);
      run.policies.onSent(Math.max(0, remainingBytes - (out.normal + out.zero) * PAGE_SIZE), clock.now() + chunkNs);
      await run.elapse(chunkNs);
      run.progress("send", { round: select ? run.report.dirtySyncCount : 0, passBytes: remainingBytes, passSentBytes: (out.normal + out.zero) * PAGE_SIZE });
      if (select && midPass) {
        const found = await midPass.due();
        if (found) remainingBytes += merge(select, found, midPass.carry, run.src.memslots.map((m) => m.memslot!.slot), slotIndex, first + count) * PAGE_SIZE;
      }
    }
  }
  await pending;
  await run.elapse(link.latencyNs);
  return out;
}
