/**
 * QEMU's calc-dirty-rate (migration/dirtyrate.c), measured on a running VM:
 * - page-sampling: sample_pages pages per GiB of every slot of 128 MiB or
 *   more (QEMU's MIN_RAMBLOCK_SIZE) are "hashed" at the start and the end (a
 *   page's content word: a rewrite of the same value leaves it unchanged, as
 *   a rewrite leaves a hash); logging stays off, so the guest pays nothing.
 *   Rate = dirty samples x slots' MiB x 1000 / (samples x ms).
 * - dirty-bitmap: logging on for every writable slot, the dirty pages counted
 *   by GET at the end (QEMU needs no dirty ring for it), logging off.
 * - dirty-ring: logging on, the rings reaped whenever one fills (QEMU's vCPU
 *   threads do that) and at the end, each vCPU's entries counted.
 * Rate = pages x 4 KiB in MiB x 1000 / ms. The logging modes refuse a VM
 * whose slots log already: their GETs or reaps would take a migration's
 * dirty pages from it (kubevirt#17504: the probe interferes with migration).
 */
import { failedPrecondition, invalidArgument } from "../../../common/errors.js";
import * as bitmapLog from "./dirty-bitmap.js";
import { harvestRing, resetDirtyRings } from "./dirty-ring.js";
import { KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, type Memslot } from "./memslot.js";
import { Rng } from "./rng.js";
import type { Vm } from "./vm.js";

export type DirtyRateMode = "page-sampling" | "dirty-bitmap" | "dirty-ring";

export interface DirtyRateInfo {
  status: "unstarted" | "measuring" | "measured";
  /** MiB/s, QEMU's integer. */
  dirtyRateMiBps: number;
  startTimeNs: number;
  calcTimeMs: number;
  samplePages: number;
  mode: DirtyRateMode;
  vcpuDirtyRateMiBps: number[];
  dirtyPages: number;
  dirtyBytesPerSecond: number;
  guestWritesPerSecondBefore: number;
  guestWritesPerSecondDuring: number;
}

export const UNSTARTED: Readonly<DirtyRateInfo> = Object.freeze({
  status: "unstarted",
  dirtyRateMiBps: 0,
  startTimeNs: 0,
  calcTimeMs: 0,
  samplePages: 0,
  mode: "page-sampling",
  vcpuDirtyRateMiBps: [],
  dirtyPages: 0,
  dirtyBytesPerSecond: 0,
  guestWritesPerSecondBefore: 0,
  guestWritesPerSecondDuring: 0,
}) as DirtyRateInfo;

/** QEMU's limits (migration/dirtyrate.h). */
export const CALC_TIME_MS = { min: 50, max: 60_000, default: 1000 };
export const SAMPLE_PAGES = { min: 128, max: 16_384, default: 512 };
const MIN_SAMPLED_SLOT_BYTES = 128 * 2 ** 20;
/** dirty-ring mode: the guest runs in steps of this much, and full rings are reaped between them. */
const RING_STEP_NS = 1_000_000;

/** Runs the VM's guest for ns of guest time (a stepped advance, or waiting out a real-time VM). */
export type RunGuest = (ns: number) => Promise<void>;

export interface DirtyRateRequest {
  calcTimeMs: number;
  samplePages: number;
  mode: DirtyRateMode;
}

/**
 * While a logging-mode measurement runs it owns the VM's dirty log: another
 * caller's GET, CLEAR, harvest or reset would take pages from it (or it from
 * them), and a change of a slot's flags would be undone when it turns logging
 * off. Those calls are refused until it ends.
 */
export function checkNotMeasuring(vm: Vm, what: string): void {
  const m = vm.dirtyRate;
  if (m?.status === "measuring" && m.mode !== "page-sampling") {
    throw failedPrecondition(`${what}: VM ${vm.name} is measuring its dirty rate in mode ${m.mode}, which owns its dirty log until it ends`, "EBUSY");
  }
}

/** Validates a request as QEMU's qmp_calc_dirty_rate does, before anything starts. */
export function checkDirtyRateRequest(vm: Vm, r: DirtyRateRequest): void {
  const what = "calc-dirty-rate";
  if (!(r.calcTimeMs >= CALC_TIME_MS.min && r.calcTimeMs <= CALC_TIME_MS.max)) throw invalidArgument(`${what}: calc_time_ms ${r.calcTimeMs} must be in [${CALC_TIME_MS.min}, ${CALC_TIME_MS.max}]`);
  if (r.mode === "page-sampling" && !(r.samplePages >= SAMPLE_PAGES.min && r.samplePages <= SAMPLE_PAGES.max)) {
    throw invalidArgument(`${what}: sample_pages ${r.samplePages} must be in [${SAMPLE_PAGES.min}, ${SAMPLE_PAGES.max}]`);
  }
  if (vm.dirtyRate?.status === "measuring") throw failedPrecondition(`${what}: VM ${vm.name} is measuring already`, "EBUSY");
  if (r.mode === "dirty-ring" && !vm.ringEnabled) throw failedPrecondition(`${what}: mode dirty-ring needs a VM created with dirty rings; VM ${vm.name} has none`);
  if (r.mode === "dirty-bitmap" && vm.ringEnabled) throw failedPrecondition(`${what}: mode dirty-bitmap needs a VM without dirty rings (QEMU's rule); VM ${vm.name} has them: use dirty-ring`);
  if (r.mode !== "page-sampling") {
    const logging = [...vm.slots.values()].find((s) => s.logging);
    if (logging) throw failedPrecondition(`${what}: slot ${logging.id} of VM ${vm.name} is logging already (a migration?); mode ${r.mode} would take its dirty pages: measure with page-sampling`);
  }
}

const writable = (vm: Vm) => [...vm.slots.values()].filter((s) => !(s.flags & KVM_MEM_READONLY));
const guestWriteRate = (vm: Vm) => vm.vcpus.reduce((n, v) => n + v.achievedWritesPerSecond, 0);
const toMiBps = (pages: number, ms: number) => Math.floor(((pages * 4096) / 2 ** 20) * (1000 / ms));

/** One measurement; the VM's dirtyRate says "measuring" until it ends, and holds the answer after. */
export async function calcDirtyRate(vm: Vm, r: DirtyRateRequest, setSlotFlags: (slot: number, flags: number) => void, runGuest: RunGuest): Promise<DirtyRateInfo> {
  checkDirtyRateRequest(vm, r);
  const info: DirtyRateInfo = {
    ...UNSTARTED,
    status: "measuring",
    startTimeNs: vm.clockNs,
    calcTimeMs: r.calcTimeMs,
    mode: r.mode,
    samplePages: r.mode === "page-sampling" ? r.samplePages : 0,
    guestWritesPerSecondBefore: guestWriteRate(vm),
  };
  vm.dirtyRate = info;
  const calcNs = r.calcTimeMs * 1e6;
  const t0 = vm.clockNs;
  const writes = () => vm.vcpus.reduce((n, v) => n + v.total.writes, 0);
  const writesAt = writes();
  try {
    if (r.mode === "page-sampling") {
      const { dirty, samples, bytes } = await samplePages(vm, r.samplePages, calcNs, runGuest);
      info.dirtyPages = dirty;
      info.dirtyBytesPerSecond = samples > 0 ? ((dirty / samples) * bytes * 1e9) / calcNs : 0;
      info.dirtyRateMiBps = samples > 0 ? Math.floor((dirty * (bytes / 2 ** 20) * 1000) / (samples * r.calcTimeMs)) : 0;
    } else {
      const slots = writable(vm);
      for (const s of slots) setSlotFlags(s.id, s.flags | KVM_MEM_LOG_DIRTY_PAGES);
      try {
        // With INITIALLY_SET the log starts all ones: the measurement starts from clean.
        if (r.mode === "dirty-bitmap" && vm.manualProtect) for (const s of slots) clearAll(vm, s);
        if (r.mode === "dirty-bitmap") {
          await runGuest(calcNs);
          for (const s of slots) info.dirtyPages += collectBitmap(vm, s.id);
        } else {
          const perVcpu = await countRings(vm, calcNs, runGuest);
          info.vcpuDirtyRateMiBps = perVcpu.map((n) => toMiBps(n, r.calcTimeMs));
          info.dirtyPages = perVcpu.reduce((a, b) => a + b, 0);
        }
      } finally {
        // Interrupted or not, no vCPU is left out on a full ring once nobody reaps.
        if (r.mode === "dirty-ring") reapRings(vm, vm.vcpus.map(() => 0), true);
        for (const s of slots) setSlotFlags(s.id, s.flags & ~KVM_MEM_LOG_DIRTY_PAGES);
      }
      info.dirtyRateMiBps = toMiBps(info.dirtyPages, r.calcTimeMs);
      info.dirtyBytesPerSecond = (info.dirtyPages * 4096 * 1e9) / calcNs;
    }
    info.guestWritesPerSecondDuring = ((writes() - writesAt) * 1e9) / Math.max(1, vm.clockNs - t0);
    info.status = "measured";
    return info;
  } catch (err) {
    vm.dirtyRate = null;
    throw err;
  }
}

/** page-sampling: the content word of sampled pages before and after; returns dirty samples, samples and the sampled slots' bytes. */
async function samplePages(vm: Vm, perGiB: number, calcNs: number, runGuest: RunGuest): Promise<{ dirty: number; samples: number; bytes: number }> {
  // Seeded from the VM and the guest time: the same run picks the same pages.
  const rng = new Rng(BigInt(vm.config.seed) ^ BigInt(Math.floor(vm.clockNs)));
  // Per sampled slot: the pages and their content words, in typed arrays (16 bytes a sample).
  const picked: { slot: Memslot; pages: Uint32Array; words: Uint32Array }[] = [];
  let bytes = 0;
  let samples = 0;
  for (const slot of writable(vm)) {
    if (slot.size < MIN_SAMPLED_SLOT_BYTES) continue;
    bytes += slot.size;
    const n = Math.floor((slot.size * perGiB) / 2 ** 30);
    const pages = new Uint32Array(n);
    const words = new Uint32Array(2 * n);
    for (let i = 0; i < n; i++) {
      const p = (pages[i] = rng.below(slot.npages));
      words[2 * i] = slot.content[2 * p];
      words[2 * i + 1] = slot.content[2 * p + 1];
    }
    picked.push({ slot, pages, words });
    samples += n;
  }
  await runGuest(calcNs);
  let dirty = 0;
  for (const { slot, pages, words } of picked)
    for (let i = 0; i < pages.length; i++) if (slot.content[2 * pages[i]] !== words[2 * i] || slot.content[2 * pages[i] + 1] !== words[2 * i + 1]) dirty++;
  return { dirty, samples, bytes };
}

/** dirty-bitmap: the pages GET finds dirty in a slot (logging goes off next, so manual protect needs no CLEAR). */
function collectBitmap(vm: Vm, slot: number): number {
  return bitmapLog.getDirtyLog(vm, slot).dirtyPages;
}

/** Manual protect: GET and CLEAR of the whole slot, so that the log holds only what is written from now. */
function clearAll(vm: Vm, slot: Memslot): void {
  const g = bitmapLog.getDirtyLog(vm, slot.id);
  bitmapLog.clearDirtyLog(vm, slot.id, 0, slot.npages, new Uint8Array(g.bitmap.buffer, g.bitmap.byteOffset, g.bitmap.byteLength));
}

/** Harvests the full rings (all: every ring) and resets them, adding each vCPU's entries to counts. */
function reapRings(vm: Vm, counts: number[], all: boolean): void {
  let any = false;
  for (const v of vm.vcpus) {
    if (!all && !v.ringFull) continue;
    const n = harvestRing(vm, v.index, 0).count;
    counts[v.index] += n;
    any ||= n > 0;
  }
  if (any) resetDirtyRings(vm);
}

/** dirty-ring: runs the guest in steps, reaping every full ring between them (and all at the end); entries per vCPU. */
async function countRings(vm: Vm, calcNs: number, runGuest: RunGuest): Promise<number[]> {
  reapRings(vm, vm.vcpus.map(() => 0), true); // entries from before the measurement are not its
  const counts = vm.vcpus.map(() => 0);
  for (let done = 0; done < calcNs; done += RING_STEP_NS) {
    await runGuest(Math.min(RING_STEP_NS, calcNs - done));
    reapRings(vm, counts, false);
  }
  reapRings(vm, counts, true);
  return counts;
}
