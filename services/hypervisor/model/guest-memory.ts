/**
 * Guest memory as the VMM sees it: reading content words out of a slot (all
 * pages, a range, or those selected by a bitmap), writing them into another
 * VM from the host side, and a SHA-256 digest that proves two VMs equal,
 * of memory now or as it was at a resume (so that a migration's proof need
 * not keep the destination paused while it hashes).
 * Host-side accesses bypass stage-2, so they neither fault nor log.
 */
import { createHash } from "node:crypto";
import { failedPrecondition, invalidArgument } from "../../../common/errors.js";
import { ctz32, popcount32 } from "./bits.js";
import type { Memslot } from "./memslot.js";
import type { Vm } from "./vm.js";

export interface MemoryChunk {
  slot: number;
  firstPage: number;
  numPages: number;
  /** Selection, bit i = page firstPage + i; empty selects every page. */
  bitmap: Uint8Array;
  /** 8 bytes per selected page. */
  contents: Uint8Array;
}

export const DEFAULT_CHUNK_PAGES = 65536;
export const MAX_CHUNK_PAGES = 1 << 20;

function checkRange(what: string, slot: Memslot, firstPage: number, numPages: number, bitmap: Uint8Array): void {
  if (firstPage > slot.npages || numPages > slot.npages - firstPage) {
    throw invalidArgument(`${what}: pages [${firstPage}, ${firstPage + numPages}) run past slot ${slot.id}'s ${slot.npages} pages`);
  }
  if (bitmap.byteLength !== 0 && bitmap.byteLength < Math.ceil(numPages / 8)) {
    throw invalidArgument(`${what}: selection bitmap has ${bitmap.byteLength} bytes, ${numPages} pages need ${Math.ceil(numPages / 8)}`);
  }
}

const selected = (bitmap: Uint8Array, i: number) => (bitmap[i >>> 3] & (1 << (i & 7))) !== 0;

function countSelected(bitmap: Uint8Array, numPages: number): number {
  let n = 0;
  const full = numPages >>> 3;
  for (let i = 0; i < full; i++) if (bitmap[i]) n += popcount32(bitmap[i]);
  for (let i = full * 8; i < numPages; i++) if (selected(bitmap, i)) n++;
  return n;
}

/**
 * Calls visit(i) for each selected page i below numPages, in order, a byte
 * (8 pages) at a time: clean bytes cost one test, not eight.
 */
function forEachSelected(bitmap: Uint8Array, numPages: number, visit: (i: number) => void): void {
  const bytes = Math.ceil(numPages / 8);
  for (let b = 0; b < bytes; b++) {
    let m = bitmap[b];
    while (m !== 0) {
      const i = 8 * b + ctz32(m);
      if (i >= numPages) return;
      visit(i);
      m &= m - 1;
    }
  }
}

/** Splits a read into chunks of at most chunkPages pages; a chunk with nothing selected is skipped. */
export function* readMemory(
  vm: Vm,
  slotId: number,
  firstPage: number,
  numPages: number,
  bitmap: Uint8Array,
  chunkPages: number,
): Generator<MemoryChunk> {
  const slot = vm.slot(slotId, "read memory");
  if (firstPage > slot.npages) throw invalidArgument(`read memory: first_page ${firstPage} is past the end of slot ${slotId} (${slot.npages} pages)`);
  const n = numPages === 0 ? slot.npages - firstPage : numPages;
  checkRange("read memory", slot, firstPage, n, bitmap);
  if (!Number.isInteger(chunkPages) || chunkPages < 8 || chunkPages > MAX_CHUNK_PAGES || chunkPages % 8 !== 0) {
    throw invalidArgument(`read memory: chunk_pages ${chunkPages} must be a multiple of 8 in [8, ${MAX_CHUNK_PAGES}]`);
  }
  const words = slot.content;
  for (let off = 0; off < n; off += chunkPages) {
    const count = Math.min(chunkPages, n - off);
    const p0 = firstPage + off;
    if (bitmap.byteLength === 0) {
      // A view of live memory: the server serializes each chunk as soon as it is yielded.
      const bytes = new Uint8Array(words.buffer, words.byteOffset + p0 * 8, count * 8);
      yield { slot: slotId, firstPage: p0, numPages: count, bitmap: new Uint8Array(0), contents: bytes };
      continue;
    }
    const sel = bitmap.subarray(off >>> 3, (off + count + 7) >>> 3);
    const k = countSelected(sel, count);
    if (k === 0) continue;
    const out = new Uint32Array(2 * k);
    let j = 0;
    forEachSelected(sel, count, (i) => {
      out[j++] = words[2 * (p0 + i)];
      out[j++] = words[2 * (p0 + i) + 1];
    });
    // The chunk's own selection starts at bit 0; off is a multiple of 8 so the bytes line up.
    const chunkSel = new Uint8Array(sel.byteLength);
    chunkSel.set(sel);
    if (count & 7) chunkSel[chunkSel.length - 1] &= (1 << (count & 7)) - 1;
    yield { slot: slotId, firstPage: p0, numPages: count, bitmap: chunkSel, contents: new Uint8Array(out.buffer) };
  }
}

/** The bytes as 32-bit words: a view when they are aligned (as a decoded message's usually are), else a copy. */
function wordsOf(bytes: Uint8Array, words: number): Uint32Array {
  if (bytes.byteOffset % 4 === 0) return new Uint32Array(bytes.buffer, bytes.byteOffset, words);
  const out = new Uint32Array(words);
  new Uint8Array(out.buffer).set(bytes.subarray(0, 4 * words));
  return out;
}

/** Writes one chunk's content words; returns pages written. */
export function writeMemory(vm: Vm, chunk: MemoryChunk, arriveAtNs = 0): number {
  const slot = vm.slot(chunk.slot, "write memory");
  checkRange("write memory", slot, chunk.firstPage, chunk.numPages, chunk.bitmap);
  const all = chunk.bitmap.byteLength === 0;
  const k = all ? chunk.numPages : countSelected(chunk.bitmap, chunk.numPages);
  if (chunk.contents.byteLength !== k * 8) {
    throw invalidArgument(`write memory: ${k} selected pages need ${k * 8} content bytes, got ${chunk.contents.byteLength}`);
  }
  const src = wordsOf(chunk.contents, 2 * k);
  const dst = slot.content;
  if (vm.postcopy) return land(vm, slot, chunk, src, Math.max(arriveAtNs, vm.clockNs));
  if (arriveAtNs !== 0) throw invalidArgument(`write memory: arrive_at_ns is for a VM in post-copy; VM ${vm.name} is not`);
  if (all) {
    dst.set(src, 2 * chunk.firstPage);
    return k;
  }
  let j = 0;
  const first = chunk.firstPage;
  forEachSelected(chunk.bitmap, chunk.numPages, (i) => {
    dst[2 * (first + i)] = src[j++];
    dst[2 * (first + i) + 1] = src[j++];
  });
  return k;
}

/**
 * Post-copy's placing of pages (UFFDIO_COPY): a missing page takes the
 * content and lands at `at` (its copy also goes into the resume snapshot,
 * which so becomes the source's memory at the switch); a page already here
 * keeps what it has, so a late copy never overwrites the guest's writes.
 * Returns the pages placed.
 */
function land(vm: Vm, slot: Memslot, chunk: MemoryChunk, src: Uint32Array, at: number): number {
  const pc = vm.postcopy!;
  const snap = vm.resumeSnapshot?.get(slot.id);
  const first = chunk.firstPage;
  let j = 0;
  let placed = 0;
  const place = (i: number) => {
    const p = first + i;
    if (pc.land(slot.id, p, at)) {
      slot.content[2 * p] = src[j];
      slot.content[2 * p + 1] = src[j + 1];
      if (snap) {
        snap[2 * p] = src[j];
        snap[2 * p + 1] = src[j + 1];
      }
      placed++;
    }
    j += 2;
  };
  if (chunk.bitmap.byteLength === 0) for (let i = 0; i < chunk.numPages; i++) place(i);
  else forEachSelected(chunk.bitmap, chunk.numPages, place);
  return placed;
}

/** Bytes hashed between yields to the event loop (about 30 ms of SHA-256 here; one update also takes at most 2^31 - 1 bytes). */
const DIGEST_PIECE_BYTES = 64 * 1024 * 1024;

/** Bytes a resume snapshot of vm takes: a copy of every slot's content words. */
export function resumeSnapshotBytes(vm: Vm): number {
  let n = 0;
  for (const s of vm.slots.values()) n += s.content.byteLength;
  return n;
}

/** Copies every slot's content as it is now, before the vCPUs resume (a memcpy: the guest's time does not move). */
/**
 * Copies every slot's content as the resume snapshot, in pieces with a turn
 * of the event loop between them: a 1 TiB guest's 2 GiB of content in one
 * copy held the event loop for 6.7 s, past a client's keepalive, which then
 * dropped the connection. Nothing may change the content meanwhile: with
 * every vCPU paused only RPCs could, and the VM refuses them while it is busy
 * (Hypervisor.vm). With a vCPU running the guest could, so it copies at once.
 */
export async function takeResumeSnapshot(vm: Vm, yieldNow: () => Promise<unknown>): Promise<void> {
  const slots = [...vm.slots.values()];
  if (vm.vcpus.some((v) => !v.paused)) {
    vm.resumeSnapshot = new Map(slots.map((s) => [s.id, s.content.slice()]));
    return;
  }
  const snapshot = new Map<number, Uint32Array>();
  vm.busy = "taking its resume snapshot";
  try {
    for (const s of slots) {
      const copy = new Uint32Array(s.content.length);
      for (let i = 0; i < copy.length; i += DIGEST_PIECE_BYTES / 4) {
        copy.set(s.content.subarray(i, i + DIGEST_PIECE_BYTES / 4), i);
        await yieldNow();
      }
      snapshot.set(s.id, copy);
    }
  } finally {
    vm.busy = null;
  }
  vm.resumeSnapshot = snapshot;
}

/**
 * SHA-256 over each slot's (id, base GPA, pages) and content words, in
 * slot-id order, in pieces with a turn of the event loop between them.
 * yieldNow is awaited between pieces (the server passes setImmediate).
 * atResume hashes the snapshot the last ResumeVm took instead, and frees it.
 */
export async function digest(vm: Vm, yieldNow: () => Promise<unknown>, atResume = false): Promise<{ sha256: Buffer; pages: number }> {
  const snapshot = vm.resumeSnapshot;
  if (atResume && !snapshot) throw failedPrecondition(`memory digest at resume: VM ${vm.name} has no resume snapshot (ResumeVm with snapshot takes one; a digest frees it)`);
  if (atResume && vm.postcopy) {
    throw failedPrecondition(`memory digest at resume: VM ${vm.name} is in post-copy; ${vm.postcopy.unsent} pages are not sent and the last lands at ${(vm.postcopy.lastArrivalNs / 1e9).toFixed(6)} s`);
  }
  if (atResume) vm.resumeSnapshot = null;
  const h = createHash("sha256");
  let pages = 0;
  for (const s of [...vm.slots.values()].sort((a, b) => a.id - b.id)) {
    const content = atResume ? snapshot!.get(s.id) : s.content;
    if (!content) throw failedPrecondition(`memory digest at resume: slot ${s.id} of VM ${vm.name} was added after the resume`);
    const header = Buffer.alloc(24);
    header.writeUInt32LE(s.id, 0);
    header.writeBigUInt64LE(BigInt(s.gpa), 8);
    header.writeBigUInt64LE(BigInt(s.npages), 16);
    h.update(header);
    for (let off = 0; off < content.byteLength; off += DIGEST_PIECE_BYTES) {
      h.update(new Uint8Array(content.buffer, content.byteOffset + off, Math.min(DIGEST_PIECE_BYTES, content.byteLength - off)));
      await yieldNow();
    }
    pages += s.npages;
  }
  return { sha256: h.digest(), pages };
}
