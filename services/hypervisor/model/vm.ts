/**
 * A VM: memslots with their stage-2 ranges, vCPUs with TLBs and workloads, a
 * virtual clock, the capabilities enabled on it, and the write path every
 * guest write takes (TLB, descriptor walk, stage-2 fault, dirty log).
 */
import { failedPrecondition, invalidArgument, notFound } from "../../../common/errors.js";
import type { CostModel } from "./cost-model.js";
import { BLOCK_RW, PAGES_1G, PAGES_2M, PAGE_RW, S2AP_W } from "./descriptor.js";
import * as bitmapLog from "./dirty-bitmap.js";
import { KVM_MEM_LOG_DIRTY_PAGES, Memslot } from "./memslot.js";
import { deriveSeed } from "./rng.js";
import { Level } from "./stage2.js";
import { Tlb } from "./tlb.js";
import { Vcpu } from "./vcpu.js";
import { BATCH, IDLE, WorkloadGen, type WorkloadSpec } from "./workload.js";

export type BackingPageSize = "4K" | "2M" | "1G";
export type ClockDrive = "stepped" | "realtime";

export const MANUAL_PROTECT_ENABLE = 1n;
export const INITIALLY_SET = 2n;

export interface VmConfig {
  name: string;
  vmid: number;
  vcpus: number;
  backing: BackingPageSize;
  ipaBits: number;
  clock: ClockDrive;
  realtimeSpeed: number;
  seed: bigint;
  tlbEntries: number;
  costs: CostModel;
}

export type FaultKind = "none" | "translation" | "permission";

export interface WriteOutcome {
  fault: FaultKind;
  logged: boolean;
  mmio: boolean;
  costNs: number;
}

/** A stretch of the VM's writable pages, in slot order: workload page indices map onto these. */
interface Segment {
  start: number;
  end: number;
  slot: Memslot;
}

/** Guest time each vCPU runs before the next one takes its turn within a step. */
const QUANTUM_NS = 1_000_000;
const TWO32 = 4294967296;

export class Vm {
  readonly slots = new Map<number, Memslot>();
  readonly vcpus: Vcpu[];
  clockNs = 0;
  /** Wall-clock reference of the real-time drive (performance.now() ms). */
  wallRefMs = 0;
  manualProtectFlags = 0n;
  eagerSplitChunk = 0;
  tlbFlushes = 0;
  skipTlbFlushAfterWriteProtect = false;
  /** The VM's write sequence: the value of SEQUENCE writes. */
  private writeSeq = 0;
  private segments: Segment[] = [];
  private writablePages = 0;
  private specs: WorkloadSpec[];

  constructor(readonly config: VmConfig) {
    this.specs = Array.from({ length: config.vcpus }, () => IDLE);
    this.vcpus = this.specs.map((s, i) => new Vcpu(i, new Tlb(config.tlbEntries), this.makeGen(s, i)));
  }

  get name(): string {
    return this.config.name;
  }
  get costs(): CostModel {
    return this.config.costs;
  }
  get manualProtect(): boolean {
    return (this.manualProtectFlags & MANUAL_PROTECT_ENABLE) !== 0n;
  }
  get initiallySet(): boolean {
    return (this.manualProtectFlags & INITIALLY_SET) !== 0n;
  }
  get eagerSplit(): boolean {
    return this.eagerSplitChunk !== 0;
  }
  get memoryBytes(): number {
    let n = 0;
    for (const s of this.slots.values()) n += s.size;
    return n;
  }
  get totalWritablePages(): number {
    return this.writablePages;
  }

  // ---- memslots -------------------------------------------------------------------------------

  sortedSlots(): Memslot[] {
    return [...this.slots.values()].sort((a, b) => a.gpa - b.gpa);
  }

  slotOfGpa(gpa: number): Memslot | undefined {
    for (const s of this.slots.values()) if (gpa >= s.gpa && gpa < s.endGpa) return s;
    return undefined;
  }

  slot(id: number, what: string): Memslot {
    if (id >>> 16 !== 0) throw invalidArgument(`${what}: address space ${id >>> 16} does not exist on arm64 (slot ${id})`, "EINVAL");
    const s = this.slots.get(id);
    if (!s) throw notFound(`${what}: VM ${this.name} has no memslot ${id}`, "ENOENT");
    return s;
  }

  addSlot(slot: Memslot): number {
    this.slots.set(slot.id, slot);
    this.layoutChanged();
    return slot.flags & KVM_MEM_LOG_DIRTY_PAGES ? bitmapLog.enableLogging(this, slot) : 0;
  }

  deleteSlot(slot: Memslot): void {
    this.slots.delete(slot.id);
    this.flushAllTlbs();
    this.layoutChanged();
  }

  /** Applies a flags change on a live slot; returns host ns. */
  setSlotFlags(slot: Memslot, flags: number): number {
    const wasLogging = (slot.flags & KVM_MEM_LOG_DIRTY_PAGES) !== 0;
    const logging = (flags & KVM_MEM_LOG_DIRTY_PAGES) !== 0;
    slot.flags = flags;
    if (logging && !wasLogging) return bitmapLog.enableLogging(this, slot);
    if (!logging && wasLogging) return bitmapLog.disableLogging(this, slot);
    return 0;
  }

  private layoutChanged(): void {
    let start = 0;
    this.segments = [];
    for (const s of this.sortedSlots()) {
      if (s.readonly) continue;
      this.segments.push({ start, end: start + s.npages, slot: s });
      start += s.npages;
    }
    this.writablePages = start;
    this.vcpus.forEach((v, i) => (v.gen = this.makeGen(this.specs[i], i)));
  }

  private makeGen(spec: WorkloadSpec, i: number): WorkloadGen {
    const seed = spec.seed || deriveSeed(this.config.seed, i);
    const clamped = spec.firstPage >= this.writablePages ? { ...spec, pattern: "idle" as const } : spec;
    return new WorkloadGen(clamped, this.writablePages, seed, i, this.config.vcpus);
  }

  setWorkload(vcpu: number | undefined, spec: WorkloadSpec): void {
    const targets = vcpu === undefined ? this.vcpus.map((v) => v.index) : [vcpu];
    for (const i of targets) {
      this.specs[i] = spec;
      this.vcpus[i].gen = this.makeGen(spec, i);
    }
  }

  workloadOf(vcpu: number): WorkloadSpec {
    return this.specs[vcpu];
  }

  // ---- TLB maintenance ------------------------------------------------------------------------

  flushAllTlbs(): void {
    for (const v of this.vcpus) v.tlb.flush();
    this.tlbFlushes++;
  }

  flushTlbsAfterWriteProtect(): boolean {
    if (this.skipTlbFlushAfterWriteProtect) return false;
    this.flushAllTlbs();
    return true;
  }

  private invalidateRangeAll(gfn: number, n: number): void {
    for (const v of this.vcpus) v.tlb.invalidateRange(gfn, n);
  }

  // ---- the write path -------------------------------------------------------------------------

  /**
   * Advances the VM's clock by durationNs, running every unpaused vCPU's
   * workload in 1 ms quanta, round robin, so that vCPUs interleave.
   */
  advance(durationNs: number): void {
    const end = this.clockNs + durationNs;
    for (const v of this.vcpus) {
      v.beginStep();
      v.stepDurationNs = durationNs;
    }
    for (let t = this.clockNs; t < end; ) {
      const tq = Math.min(t + QUANTUM_NS, end);
      for (const v of this.vcpus) {
        if (v.paused || v.time >= tq) v.time = Math.max(v.time, tq);
        else this.run(v, tq);
      }
      t = tq;
    }
    this.clockNs = end;
  }

  /** Runs vCPU v's workload until its local clock reaches until. The hot loop: typed arrays only. */
  private run(v: Vcpu, until: number): void {
    const gen = v.gen;
    if (!gen.active || this.segments.length === 0) {
      v.time = until;
      return;
    }
    const interval = Math.max(1e9 / gen.spec.writesPerSecond, this.costs.writeNs);
    const epochMode = gen.spec.value === "epoch";
    const eLo = gen.epochLo;
    const eHi = gen.epochHi;
    const tlb = v.tlb.entries;
    const mask = v.tlb.mask;
    const batch = gen.batch;
    let seg = this.segments[0];
    let segStart = seg.start;
    let segEnd = seg.end;
    let writable = seg.slot.s2.writable;
    let content = seg.slot.content;
    let base = seg.slot.baseGfn;
    let t = v.time;
    let seq = this.writeSeq;
    let writes = 0;
    let faults = 0;
    let overhead = 0;
    // The batch cursor lives in a local: writeMiss() cannot move it, but the JIT cannot know that.
    let cur = gen.cursor;
    while (t < until) {
      if (cur === BATCH) {
        gen.refill();
        cur = 0;
      }
      const vp = batch[cur++];
      if (vp < segStart || vp >= segEnd) {
        seg = this.segmentOf(vp);
        segStart = seg.start;
        segEnd = seg.end;
        writable = seg.slot.s2.writable;
        content = seg.slot.content;
        base = seg.slot.baseGfn;
      }
      const p = vp - segStart;
      const gfn = base + p;
      const ti = gfn & mask;
      if (tlb[ti] !== gfn) {
        if ((writable[p >>> 5] >>> (p & 31)) & 1) tlb[ti] = gfn;
        else {
          const cost = this.writeMiss(v, seg.slot, p, gfn);
          if (cost > 0) {
            faults++;
            if (seg.slot.logging) overhead += cost;
            t += cost;
          }
        }
      }
      if (epochMode) {
        content[2 * p] = eLo;
        content[2 * p + 1] = eHi;
      } else {
        seq++;
        content[2 * p] = seq >>> 0; // ToUint32 is seq mod 2^32, without fmod
        content[2 * p + 1] = seq < TWO32 ? 0 : Math.floor(seq / TWO32);
      }
      t += interval;
      writes++;
    }
    gen.cursor = cur;
    this.writeSeq = seq;
    v.time = t;
    v.count(writes, faults, overhead);
  }

  private segmentOf(vp: number): Segment {
    const segs = this.segments;
    let lo = 0;
    let hi = segs.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (segs[mid].start <= vp) lo = mid;
      else hi = mid - 1;
    }
    return segs[lo];
  }

  /**
   * The TLB missed and the level-3 descriptor is not a writable page: walk
   * for a writable block, or take a stage-2 fault. Returns the fault's cost
   * (0 when the walk found a writable leaf).
   */
  private writeMiss(v: Vcpu, slot: Memslot, p: number, gfn: number): number {
    const level = slot.s2.leafLevel(p);
    if (level === Level.Block2M || level === Level.Block1G) {
      const [pl, i] = slot.s2.leafRef(p, level);
      if (pl.lo[i] & S2AP_W) {
        v.tlb.fill(gfn);
        return 0;
      }
    }
    this.fault(v, slot, p, gfn, level);
    return level === Level.Unmapped ? this.costs.translationFaultNs : this.costs.writeFaultNs;
  }

  /**
   * user_mem_abort for a write: while the slot is logging, map a 4 KiB page
   * (breaking a block first, its other pages to fault back in), make it
   * writable and mark it dirty; otherwise map the largest block the backing
   * allows, coalescing any table below it. Returns whether the write was
   * logged (its dirty bit went from clear to set).
   */
  private fault(v: Vcpu, slot: Memslot, p: number, gfn: number, level: Level): boolean {
    const s2 = slot.s2;
    if (slot.logging) {
      if (level === Level.Block2M || level === Level.Block1G) {
        const pages = level === Level.Block1G ? PAGES_1G : PAGES_2M;
        s2.splitBlockAt(p, false);
        this.invalidateRangeAll(Math.floor(gfn / pages) * pages, pages);
        s2.mapPage(p, PAGE_RW);
      } else if (level === Level.Page) s2.setPageAttrs(p, PAGE_RW);
      else s2.mapPage(p, PAGE_RW);
    } else {
      const target = this.blockLevelFor(slot, p);
      if (target === Level.Page) {
        if (level === Level.Page) s2.setPageAttrs(p, PAGE_RW);
        else s2.mapPage(p, PAGE_RW);
      } else if (level === target) {
        const [pl, i] = s2.leafRef(p, level);
        pl.lo[i] |= S2AP_W;
      } else {
        const pages = target === Level.Block1G ? PAGES_1G : PAGES_2M;
        s2.mapBlock(p, target, BLOCK_RW);
        this.invalidateRangeAll(Math.floor(gfn / pages) * pages, pages);
      }
    }
    v.tlb.fill(gfn);
    return slot.markDirty(p);
  }

  private blockLevelFor(slot: Memslot, p: number): Level.Page | Level.Block2M | Level.Block1G {
    const b = this.config.backing;
    if (b === "1G" && slot.s2.blockFits(p, PAGES_1G)) return Level.Block1G;
    if (b !== "4K" && slot.s2.blockFits(p, PAGES_2M)) return Level.Block2M;
    return Level.Page;
  }

  /** One explicit guest write by vCPU vcpu, through its TLB, as the workload's writes go. */
  guestWrite(vcpu: number, gpa: number, value: bigint): WriteOutcome {
    const v = this.vcpu(vcpu, "guest write");
    if (v.paused) throw failedPrecondition(`guest write: vCPU ${vcpu} of VM ${this.name} is paused`);
    const slot = this.slotOfGpa(gpa);
    if (!slot) throw invalidArgument(`guest write: GPA 0x${gpa.toString(16)} is outside every memslot of VM ${this.name}`);
    if (slot.readonly) {
      v.count(0, 0, 0, 1);
      return { fault: "none", logged: false, mmio: true, costNs: 0 };
    }
    const p = slot.npages === 0 ? 0 : Math.floor((gpa - slot.gpa) / 4096);
    const gfn = slot.baseGfn + p;
    const out: WriteOutcome = { fault: "none", logged: false, mmio: false, costNs: 0 };
    if (!v.tlb.holds(gfn)) {
      const level = slot.s2.leafLevel(p);
      const [pl, i] = slot.s2.leafRef(p, level);
      if (level !== Level.Unmapped && pl.lo[i] & S2AP_W) v.tlb.fill(gfn);
      else {
        out.fault = level === Level.Unmapped ? "translation" : "permission";
        out.costNs = out.fault === "translation" ? this.costs.translationFaultNs : this.costs.writeFaultNs;
        out.logged = this.fault(v, slot, p, gfn, level);
      }
    }
    slot.content[2 * p] = Number(value & 0xffffffffn);
    slot.content[2 * p + 1] = Number(value >> 32n);
    out.costNs += this.costs.writeNs;
    v.time += out.costNs;
    v.count(1, out.fault === "none" ? 0 : 1, out.fault !== "none" && slot.logging ? out.costNs - this.costs.writeNs : 0);
    return out;
  }

  vcpu(index: number, what: string): Vcpu {
    const v = this.vcpus[index];
    if (!v) throw invalidArgument(`${what}: VM ${this.name} has no vCPU ${index} (it has ${this.vcpus.length})`);
    return v;
  }

  // ---- dirty log ------------------------------------------------------------------------------

  private loggingSlot(id: number, what: string): Memslot {
    if (id >>> 16 === 0 && (id & 0xffff) >= 32767) throw invalidArgument(`${what}: slot id ${id} >= KVM_USER_MEM_SLOTS`, "EINVAL");
    const slot = this.slot(id, what);
    if (!slot.logging) throw failedPrecondition(`${what}: dirty logging is off for slot ${id} of VM ${this.name}`, "ENOENT");
    return slot;
  }

  getDirtyLog(slotId: number): bitmapLog.GetDirtyLogResult & { numPages: number } {
    const slot = this.loggingSlot(slotId, "GET_DIRTY_LOG");
    return { ...bitmapLog.getDirtyLog(this, slot), numPages: slot.npages };
  }

  clearDirtyLog(slotId: number, firstPage: number, numPages: number, bitmap: Uint8Array): bitmapLog.ClearDirtyLogResult {
    if (firstPage % 64 !== 0) throw invalidArgument(`CLEAR_DIRTY_LOG: first_page ${firstPage} is not a multiple of 64`, "EINVAL");
    const slot = this.loggingSlot(slotId, "CLEAR_DIRTY_LOG");
    bitmapLog.checkClearRange(slot, firstPage, numPages, bitmap.byteLength);
    const words = Math.ceil(numPages / 64);
    const user = new Int32Array(2 * words);
    new Uint8Array(user.buffer).set(bitmap.subarray(0, words * 8));
    return bitmapLog.clearDirtyLog(this, slot, firstPage, numPages, user);
  }
}
