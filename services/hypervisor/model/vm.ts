/**
 * A VM, the generic part (virt/kvm's struct kvm): memslots with their
 * stage-2 / EPT ranges, vCPUs with TLBs and workloads, a virtual clock, the
 * capabilities enabled on it, and the write path every guest write takes
 * (TLB, descriptor walk, then the architecture's hardware update or fault
 * handler, and mark_page_dirty_in_slot). The log interfaces are in
 * dirty-bitmap.ts and dirty-ring.ts, the architecture behind arch.ts.
 */
import { failedPrecondition, invalidArgument, notFound } from "../../../common/errors.js";
import type { KvmArch, ArchName } from "./arch.js";
import { ARCHES } from "./arches.js";
import type { CostModel } from "./cost-model.js";
import type { DirtyRateInfo } from "./dirty-rate.js";
import { HI_DBM, S2AP_W } from "./descriptor.js";
import * as bitmapLog from "./dirty-bitmap.js";
import { DirtyRing, ENTRY_BYTES } from "./dirty-ring.js";
import type { HardwareDirty, HardwareDirtyName } from "./hardware-dirty.js";
import { KVM_MEM_LOG_DIRTY_PAGES, Memslot } from "./memslot.js";
import { Pml } from "./pml.js";
import { deriveSeed } from "./rng.js";
import { Level } from "./stage2.js";
import { Tlb } from "./tlb.js";
import { Vcpu } from "./vcpu.js";
import { BATCH, IDLE, workloadGen, type WorkloadGen, type WorkloadSpec } from "./workload.js";
import { CPU_THROTTLE_PCT_MAX, CpuThrottle } from "./cpu-throttle.js";
import { setVcpuDirtyLimit, type DirtyLimiter } from "./dirty-limit.js";
import { MmuLock } from "./mmu-lock.js";
import { missingBitmaps, Postcopy, refusePostcopy, type ReadStream } from "./postcopy.js";
import { WriteTracker } from "./write-track.js";

export type BackingPageSize = "4K" | "2M" | "1G";
export type Arch = ArchName;
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
  /** Dirty ring size in bytes, set before the vCPUs are created; 0 for none. */
  ringBytes: number;
  arch: Arch;
  /** x86_64: Intel PML on (kvm_intel's enable_pml), for the VM's life. */
  pml: boolean;
  /** x86_64: kvm's eager_page_split parameter (blocks split when logging starts, not on each first write). */
  eagerPageSplit: boolean;
}

export type FaultKind = "none" | "translation" | "permission" | "tracked";
/** Where mark_page_dirty_in_slot recorded a page. */
export type LogTarget = "none" | "bitmap" | "backup-bitmap" | "ring";

export interface WriteOutcome {
  fault: FaultKind;
  logged: boolean;
  mmio: boolean;
  costNs: number;
}

/** A GuestWrite's outcome. */
export interface GuestWriteOutcome extends WriteOutcome {
  /** The store retired. A store whose fault filled the dirty ring did not: it re-executes after the reset. */
  performed: boolean;
  /** The vCPU is out with KVM_EXIT_DIRTY_RING_FULL after (or instead of) this write. */
  ringFull: boolean;
}

/** A stretch of the VM's writable pages, in slot order: workload page indices map onto these. */
interface Segment {
  start: number;
  end: number;
  slot: Memslot;
}

/** Guest time each vCPU runs before the next one takes its turn within a step. */
const QUANTUM_NS = 1_000_000;
/** Mixed into a vCPU's seed for its post-copy reads' generator. */
const READ_SEED_SALT = 0x5ead5eadn;
const TWO32 = 4294967296;

/** writeBurst's other results: the vCPU's clock, the write sequence, the batch cursor. */
const burst = new Float64Array(3);
/** Why writeBurst stopped: the batch ran out or the clock reached until; the next page is in another segment; a miss. */
const BURST_DONE = 0;
const BURST_SEGMENT = 1;
const BURST_MISS = 2;

/**
 * The hot loop of every guest write that hits: from batch[cur], while the
 * page is in the segment [segStart, segEnd) and the clock is before until,
 * through the TLB (or, on a TLB miss, the writable bit of the level-3 walk
 * cache), a store of the write's value. It stops at the first page it cannot
 * write that way, leaving it unwritten for the slow path. Numbers and typed
 * arrays only, no call and no allocation, so that the JIT keeps it in
 * registers; results in burst, and why it stopped.
 */
function writeBurst(
  batch: Uint32Array,
  cur: number,
  segStart: number,
  segEnd: number,
  base: number,
  tlb: Float64Array,
  mask: number,
  writable: Int32Array,
  content: Uint32Array,
  t: number,
  until: number,
  interval: number,
  seq: number,
  epochMode: boolean,
  eLo: number,
  eHi: number,
): number {
  let why = BURST_DONE;
  while (t < until && cur < BATCH) {
    const vp = batch[cur];
    if (vp < segStart || vp >= segEnd) {
      why = BURST_SEGMENT;
      break;
    }
    const p = vp - segStart;
    const gfn = base + p;
    const ti = gfn & mask;
    if (tlb[ti] !== gfn) {
      if ((writable[p >>> 5] >>> (p & 31)) & 1) tlb[ti] = gfn;
      else {
        why = BURST_MISS;
        break;
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
    cur++;
  }
  burst[0] = t;
  burst[1] = seq;
  burst[2] = cur;
  return why;
}

export class Vm {
  readonly slots = new Map<number, Memslot>();
  readonly vcpus: Vcpu[];
  clockNs = 0;
  /** Wall-clock reference of the real-time drive (performance.now() ms). */
  wallRefMs = 0;
  manualProtectFlags = 0n;
  eagerSplitChunk = 0;
  tlbFlushes = 0;
  /** Bugs a test switches on (SetFaultInjection), to show that the checks catch them. */
  readonly injected = {
    skipTlbFlushAfterWriteProtect: false,
    skipHwLogDrain: false,
    skipRingEntryAtWrap: false,
    failEveryOtherGetCopy: false,
    skipDeviceSyncWait: false,
    /** GETs seen while failEveryOtherGetCopy is on. */
    getsSeen: 0,
  };
  /** The architecture: every arch-specific step of the generic code goes through it. */
  readonly arch: KvmArch;
  /** DIRTY_LOG_RING_WITH_BITMAP. */
  ringWithBitmap = false;
  /**
   * VTCR_EL2.HD, and the assist that collects the dirty state it produces
   * (see hardware-dirty.ts); null: write protection only.
   */
  hw: HardwareDirty | null = null;
  /** Each slot's content as it was at the last ResumeVm that asked for it (guest-memory.ts: the verifying digest hashes it). */
  resumeSnapshot: Map<number, Uint32Array> | null = null;
  /** What the VM is busy with between turns of the event loop (a resume snapshot); RPCs on it are refused meanwhile. */
  busy: string | null = null;
  /** QEMU's dirty-limit stat thread, while any vCPU is limited. */
  dirtyLimiter: DirtyLimiter | null = null;
  /** Post-copy on this (destination) VM while pages are missing; its figures stay in postcopyDone after. */
  postcopy: Postcopy | null = null;
  postcopyDone: Postcopy | null = null;
  hwDirtyUpdates = 0;
  /** Set by writeMiss: the miss took a stage-2 fault (as opposed to a walk or a hardware update), and what it did. */
  private missFaulted = false;
  /** Set by writeMiss: the miss was dirty tracking's doing (a fault or the hardware's dirty update), so its cost is tracking overhead. */
  private missTracked = false;
  /** The last miss hit a page post-copy has not sent: the vCPU waits, the write has not happened. */
  private missBlocked = false;
  /** Contention of vCPUs' faults for mmu_lock, re-evaluated every quantum from each vCPU's faults and idle time at its start. */
  private readonly mmuLock: MmuLock;
  private readonly quantumStart: Float64Array;
  private lastFault: WriteOutcome | null = null;
  readonly writeTrack = new WriteTracker();
  /** The VM's write sequence: the value of SEQUENCE writes. */
  private writeSeq = 0;
  private segments: Segment[] = [];
  private writablePages = 0;
  private specs: WorkloadSpec[];
  private advanceStart = 0;
  private advanceEnd = 0;
  /** An AdvanceVm is in progress (its slices interleave with other calls). */
  advancing = false;
  /** Until this clock time a sync holds mmu_lock with the vCPUs running (dirty-bitmap.ts): a fault waits for it. */
  hostLockUntil = 0;
  /** The last calc-dirty-rate (dirty-rate.ts), or the one in progress; null before any. */
  dirtyRate: DirtyRateInfo | null = null;
  /** Destroyed: an advance in progress stops at its next slice. */
  destroyed = false;

  constructor(readonly config: VmConfig) {
    this.arch = ARCHES[config.arch];
    this.specs = Array.from({ length: config.vcpus }, () => IDLE);
    const entries = config.ringBytes / ENTRY_BYTES;
    const reserve = this.arch.cpuDirtyLogSize(config.pml);
    this.vcpus = this.specs.map((s, i) => new Vcpu(i, new Tlb(config.tlbEntries), this.makeGen(s, i), entries ? new DirtyRing(entries, reserve) : null));
    // kvm_intel's enable_pml is the host's, for the VM's life; the arm64 assists are capabilities.
    if (config.pml) this.hw = new Pml(this, config.vcpus, config.costs);
    this.mmuLock = new MmuLock(config.costs.writeFaultNs, config.costs.faultSerialNs);
    this.quantumStart = new Float64Array(2 * config.vcpus);
  }

  get ringEnabled(): boolean {
    return this.config.ringBytes > 0;
  }

  /**
   * How this VM logs, named as the controller names mechanisms (the log, the
   * protection, the assist; defaults left out): `bitmap+manual+dbm`,
   * `ring+pml`. A bounded label value.
   */
  get mechanism(): string {
    const protection = !this.manualProtect || this.ringEnabled ? "" : this.initiallySet ? "+initially-set" : "+manual";
    return `${this.ringEnabled ? "ring" : "bitmap"}${protection}${this.hw ? `+${this.hw.name}` : ""}`;
  }

  get hwDirty(): "off" | HardwareDirtyName {
    return this.hw?.name ?? "off";
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
    if (id >>> 16 >= this.arch.addressSpaces) throw invalidArgument(`${what}: address space ${id >>> 16} does not exist on ${this.arch.name} (slot ${id})`, "EINVAL");
    const s = this.slots.get(id);
    if (!s) throw notFound(`${what}: VM ${this.name} has no memslot ${id}`, "ENOENT");
    return s;
  }

  addSlot(slot: Memslot): number {
    // Hardware dirty state about to be overwritten goes to the log first (seed 003).
    slot.s2.onDirtyLost = (p) => slot.markDirty(p);
    this.slots.set(slot.id, slot);
    this.layoutChanged();
    return slot.flags & KVM_MEM_LOG_DIRTY_PAGES ? bitmapLog.enableLogging(this, slot) : 0;
  }

  deleteSlot(slot: Memslot): void {
    this.writeTrack.removeSlot(slot);
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
    return workloadGen(clamped, this.writablePages, seed, i, this.config.vcpus).start(this.clockNs);
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

  /** Kicks vCPUs out of KVM_RUN: each is put (vcpu_put), so per-vCPU hardware logs reach the dirty log. */
  pause(indices: number[]): void {
    for (const i of indices) {
      const v = this.vcpus[i];
      if (v.paused) continue;
      v.paused = true;
      this.hw?.vcpuPut(v);
    }
  }

  /** A resumed vCPU picks up at the VM's present time; time spent paused is not owed. */
  /** Resumes the vCPUs at guest time atNs (default: now; a resume that took wall time to prepare resumes when it was asked for). */
  resume(indices: number[], atNs = this.clockNs): void {
    for (const i of indices) {
      const v = this.vcpus[i];
      if (v.paused) v.time = Math.max(v.time, atNs);
      v.paused = false;
    }
  }

  // ---- TLB maintenance ------------------------------------------------------------------------

  flushAllTlbs(): void {
    for (const v of this.vcpus) v.tlb.flush();
    this.tlbFlushes++;
  }

  /** Write protection took effect: the architecture flushes every vCPU's TLB, unless the injected bug skips it. */
  flushTlbsAfterWriteProtect(): boolean {
    if (this.injected.skipTlbFlushAfterWriteProtect) return false;
    this.arch.flushRemoteTlbs(this);
    return true;
  }

  invalidateRangeAll(gfn: number, n: number): void {
    for (const v of this.vcpus) v.tlb.invalidateRange(gfn, n);
  }

  // ---- the write path -------------------------------------------------------------------------

  /**
   * Advances the VM's clock by durationNs, running every unpaused vCPU's
   * workload in 1 ms quanta, round robin, so that vCPUs interleave.
   */
  advance(durationNs: number): void {
    this.beginAdvance(durationNs);
    this.continueAdvance(Infinity);
  }

  /** Starts an advance that continueAdvance() carries out in slices; the result is the same as advance()'s. */
  beginAdvance(durationNs: number): void {
    this.advanceStart = this.clockNs;
    this.advanceEnd = this.clockNs + durationNs;
    for (const v of this.vcpus) {
      v.beginStep();
      v.stepDurationNs = 0;
    }
  }

  /**
   * Runs whole quanta of the advance begun last until it is done (true) or
   * budgetMs of wall time has passed (false), so that a long advance never
   * holds the event loop for more than about a slice.
   */
  continueAdvance(budgetMs: number): boolean {
    const end = this.advanceEnd;
    const stopAt = Number.isFinite(budgetMs) ? performance.now() + budgetMs : Infinity;
    let t = this.clockNs;
    while (t < end) {
      const tq = Math.min(t + QUANTUM_NS, end);
      const pc = this.postcopy;
      pc?.beginQuantum(this.vcpus, t, tq);
      const contended = this.vcpus.length > 1;
      if (contended) this.markQuantum();
      for (const v of this.vcpus) {
        const reads = pc?.reads[v.index];
        if (v.paused || v.time >= tq) v.time = Math.max(v.time, tq);
        else if (reads) this.runWithReads(v, reads, tq);
        else if (v.throttle) this.runThrottled(v, v.throttle, tq);
        else this.run(v, tq);
      }
      if (pc) {
        pc.endQuantum(this.vcpus, t, tq);
        if (pc.doneBy(tq)) this.endPostcopy();
      }
      if (contended) this.contend(tq - t);
      t = tq;
      if (this.dirtyLimiter && t >= this.dirtyLimiter.nextNs) this.dirtyLimiter.tick(this.vcpus, t);
      if (stopAt !== Infinity && performance.now() >= stopAt) break;
    }
    this.clockNs = t;
    for (const v of this.vcpus) v.stepDurationNs = t - this.advanceStart;
    return t >= end;
  }

  // ---- vCPU state that migrates ---------------------------------------------------------------

  /** Each vCPU's workload with its generator's position, and the write sequence (GetVcpuState). */
  saveVcpuState(): { vcpus: { workload: WorkloadSpec; generator: Uint8Array }[]; writeSequence: number } {
    return { vcpus: this.vcpus.map((v, i) => ({ workload: this.specs[i], generator: v.gen.save(this.clockNs) })), writeSequence: this.writeSeq };
  }

  /** SetVcpuState: the vCPUs continue exactly where the saved ones stopped. Every vCPU must be paused. */
  restoreVcpuState(vcpus: { index: number; workload: WorkloadSpec; generator: Uint8Array }[], writeSequence: number): void {
    const what = "set vcpu state";
    if (this.vcpus.some((v) => !v.paused)) throw failedPrecondition(`${what}: every vCPU of VM ${this.name} must be paused`, "EBUSY");
    if (vcpus.length !== this.vcpus.length) throw invalidArgument(`${what}: ${vcpus.length} vCPU states for a VM with ${this.vcpus.length} vCPUs`, "EINVAL");
    if (!Number.isSafeInteger(writeSequence) || writeSequence < 0) throw invalidArgument(`${what}: write_sequence ${writeSequence} is out of range`, "EINVAL");
    const gens = vcpus.map((s, k) => {
      if (s.index !== k) throw invalidArgument(`${what}: state ${k} is for vCPU ${s.index}; give them in order`, "EINVAL");
      const gen = this.makeGen(s.workload, k);
      gen.restore(s.generator, `${what}: vCPU ${k}`, this.clockNs);
      return gen;
    });
    gens.forEach((g, k) => {
      this.specs[k] = vcpus[k].workload;
      this.vcpus[k].gen = g;
    });
    this.writeSeq = writeSequence;
  }

  // ---- what this VM allocates -----------------------------------------------------------------

  /** Bytes of every typed array this VM holds (the hypervisor's memory budget counts these). */
  get allocatedBytes(): number {
    let n = 0;
    for (const s of this.slots.values()) n += s.allocatedBytes;
    for (const v of this.vcpus) n += v.allocatedBytes;
    let snapshot = 0;
    for (const c of this.resumeSnapshot?.values() ?? []) snapshot += c.byteLength;
    // vCPUs given one SetWorkload share its trace.
    for (const t of new Set(this.specs.map((sp) => sp.trace))) if (t) n += t.pages.byteLength + t.offsets.byteLength;
    return n + this.writeTrack.allocatedBytes + (this.hw?.allocatedBytes ?? 0) + snapshot + (this.postcopy?.allocatedBytes ?? 0);
  }

  /**
   * Runs vCPU v's workload until its local clock reaches until: writeBurst()
   * stores the writes that hit, and this loop refills the batch, moves between
   * segments, and takes each miss through writeMiss(). The miss's write then
   * completes; the loop stops early on one condition, whatever made it
   * pending (a fault's push or a PML drain that filled the ring): the next
   * guest entry exits.
   */
  private run(v: Vcpu, until: number): void {
    const gen = v.gen;
    if (v.ringFull) return v.stall(v.time, until);
    if (this.postcopy?.waits[v.index]) {
      v.time = Math.max(v.time, until);
      return;
    }
    if (v.limitSleepUntil > v.time) {
      const wake = Math.min(v.limitSleepUntil, until);
      v.count({ dirtyLimitNs: wake - v.time });
      v.time = wake;
      if (wake >= until) return;
    }
    if (!gen.active || this.segments.length === 0) {
      v.time = until;
      return;
    }
    let interval = Math.max(1e9 / gen.writesPerSecond, this.costs.writeNs);
    const epochMode = gen.spec.value === "epoch";
    const eLo = gen.epochLo;
    const eHi = gen.epochHi;
    const tlb = v.tlb.entries;
    const mask = v.tlb.mask;
    const batch = gen.batch;
    let seg = this.segments[0];
    let slot = seg.slot;
    let t = v.time;
    let seq = this.writeSeq;
    let writes = 0;
    let faults = 0;
    let overhead = 0;
    let cur = gen.cursor;
    while (t < until) {
      if (cur === BATCH) {
        cur = gen.refill(t);
        if (cur === BATCH) {
          // Nothing to write until then (a trace's quiet stretch).
          t = Math.min(until, gen.idleUntilNs);
          continue;
        }
        interval = Math.max(1e9 / gen.writesPerSecond, this.costs.writeNs);
      }
      const vp = batch[cur];
      if (vp < seg.start || vp >= seg.end) {
        seg = this.segmentOf(vp);
        slot = seg.slot;
      }
      const why = writeBurst(batch, cur, seg.start, seg.end, slot.baseGfn, tlb, mask, slot.s2.writable, slot.content, t, until, interval, seq, epochMode, eLo, eHi);
      t = burst[0];
      seq = burst[1];
      const done = burst[2] | 0;
      writes += done - cur;
      cur = done;
      if (why !== BURST_MISS) continue;
      const p = batch[cur++] - seg.start;
      // The value this write stores, computed on the slow path only (a tracked write reports it).
      const next = seq + 1;
      const lo = epochMode ? eLo : next >>> 0;
      const hi = epochMode ? eHi : next < TWO32 ? 0 : Math.floor(next / TWO32);
      const cost = this.writeMiss(v, slot, p, slot.baseGfn + p, lo, hi, t, true);
      if (this.missBlocked) {
        cur--; // the write waits for its page
        break;
      }
      if (this.missFaulted) faults++;
      if (this.missTracked && slot.logging) overhead += cost;
      if (v.ringFull && this.storeWaitsForRing()) {
        t += cost;
        cur--;
        break;
      }
      t += cost + interval;
      if (!epochMode) seq = next;
      slot.content[2 * p] = lo;
      slot.content[2 * p + 1] = hi;
      writes++;
      if (v.ringFull) break;
    }
    gen.cursor = cur;
    this.writeSeq = seq;
    v.time = this.missBlocked ? Math.max(t, until) : t;
    v.ran(writes, faults, overhead);
    if (v.ringFull) {
      // KVM_EXIT_DIRTY_RING_FULL returns to the VMM: the exit and the re-entry are the vCPU's time, then it waits for the reset.
      const exitNs = this.costs.userspaceExitNs;
      v.count({ ringFullExits: 1, overheadNs: exitNs });
      v.time = t + exitNs;
      v.stall(v.time, until);
    }
  }

  /** Each vCPU's faults and idle time so far, at the start of a quantum. */
  private markQuantum(): void {
    const q = this.quantumStart;
    this.vcpus.forEach((v, i) => {
      q[2 * i] = v.total.writeFaults;
      q[2 * i + 1] = v.total.ringStallNs + v.total.throttleNs + v.total.dirtyLimitNs;
    });
  }

  /** The quantum of length ns is over: what its faults demanded of mmu_lock sets the next one's wait. */
  private contend(ns: number): void {
    const q = this.quantumStart;
    const fault = this.costs.writeFaultNs + this.mmuLock.waitNs;
    this.mmuLock.update(
      this.vcpus.map((v, i) => {
        const faults = v.paused ? 0 : v.total.writeFaults - q[2 * i];
        const idle = v.total.ringStallNs + v.total.throttleNs + v.total.dirtyLimitNs - q[2 * i + 1];
        return { faults, otherNs: Math.max(0, ns - idle - faults * fault) };
      }),
    );
  }

  /** run() within the throttle's running windows; its sleeps pass as guest time with no guest work. */
  private runThrottled(v: Vcpu, th: CpuThrottle, until: number): void {
    while (v.time < until && !v.ringFull) {
      const ph = th.phase(v.time);
      const end = Math.min(Math.max(ph.until, v.time + 1), until);
      if (ph.asleep) {
        v.count({ throttleNs: end - v.time });
        v.time = end;
      } else this.run(v, end);
    }
    if (v.ringFull) this.run(v, until);
  }

  /** QEMU's cpu_throttle_set (1-99) or cpu_throttle_stop (0) on the given vCPUs; its periods start now. */
  setCpuThrottle(indices: number[], percentage: number): void {
    const what = "set cpu throttle";
    if (!Number.isInteger(percentage) || percentage < 0 || percentage > CPU_THROTTLE_PCT_MAX) {
      throw invalidArgument(`${what}: percentage ${percentage} must be 0 (off) or 1-${CPU_THROTTLE_PCT_MAX} (max-cpu-throttle)`, "EINVAL");
    }
    const vcpus = indices.map((i) => this.vcpu(i, what));
    for (const v of vcpus) v.throttle = percentage === 0 ? null : new CpuThrottle(percentage, Math.max(v.time, this.clockNs));
  }

  /** QEMU's set-vcpu-dirty-limit (rate in MB/s; 0 cancels) on the given vCPUs, measured every periodMs. */
  setVcpuDirtyLimit(indices: number[], rateMBps: number, periodMs: number): void {
    const vcpus = indices.map((i) => this.vcpu(i, "set vcpu dirty limit"));
    const ringEntries = this.ringEnabled ? this.config.ringBytes / ENTRY_BYTES : 0;
    this.dirtyLimiter = setVcpuDirtyLimit(this.dirtyLimiter, { name: this.name, ringEntries, clockNs: this.clockNs, vcpus: this.vcpus }, vcpus, rateMBps, periodMs);
  }

  /**
   * run() with the vCPU's post-copy reads in between, in time order: a read
   * of a page that is here does nothing; one of a missing page waits for it
   * as a write would.
   */
  private runWithReads(v: Vcpu, rs: ReadStream, until: number): void {
    const pc = this.postcopy!;
    while (v.time < until && !pc.waits[v.index] && !v.ringFull) {
      const next = Math.min(rs.nextAt, until);
      if (next > v.time) {
        if (v.throttle) this.runThrottled(v, v.throttle, next);
        else this.run(v, next);
      }
      if (pc.waits[v.index] || v.ringFull || rs.nextAt >= until) break;
      if (rs.gen.cursor === rs.gen.batch.length) {
        rs.gen.refill(v.time);
      }
      const vp = rs.gen.batch[rs.gen.cursor];
      const seg = this.segmentOf(vp);
      const p = vp - seg.start;
      const t = Math.max(v.time, rs.nextAt);
      let go = t;
      if (pc.arrivalOf(seg.slot.id, p) > t) go = pc.fault(v, seg.slot, p, (seg.slot.baseGfn + p) * 4096, t);
      if (go === Infinity) {
        v.time = until;
        break; // the read waits for its page, and happens when it lands
      }
      rs.gen.cursor++;
      v.time = go;
      rs.nextAt = go + rs.intervalNs;
    }
  }

  /**
   * Post-copy begins on this destination: the pages set in missing are not
   * here (their content is stale) until WriteMemory lands them. The VM must
   * be paused and not logging, back guest memory with 4 KiB pages, and have
   * none of those pages mapped at stage 2 (its guest has not touched them).
   */
  startPostcopy(given: { slot: number; bitmap: Uint8Array }[]): void {
    if (this.postcopy) refusePostcopy(`VM ${this.name} is already in post-copy`);
    if (this.vcpus.some((v) => !v.paused)) refusePostcopy(`every vCPU of VM ${this.name} must be paused`);
    if (this.config.backing !== "4K") refusePostcopy(`VM ${this.name} is backed by ${this.config.backing} pages; userfaultfd resolves a huge page whole, which is not modelled (use 4 KiB backing)`);
    const missing = missingBitmaps(this.slots, given);
    for (const s of this.slots.values()) {
      if (s.logging) refusePostcopy(`slot ${s.id} of VM ${this.name} is logging dirty pages`);
      const bm = missing.get(s.id);
      if (!bm) continue;
      for (let p = 0; p < s.npages; p++) {
        if ((bm[p >>> 3] >> (p & 7)) & 1 && s.s2.leafLevel(p) !== Level.Unmapped) {
          refusePostcopy(`page ${p} of slot ${s.id} is missing but mapped at stage 2 (its guest touched it before the switch)`);
        }
      }
    }
    const reads = this.vcpus.map((v, i): ReadStream | null => {
      const spec = this.specs[i];
      if (!(spec.readsPerSecond > 0) || !v.gen.active) return null;
      // Reads follow the vCPU's pattern from a generator of their own, so its writes stay as they would be.
      const gen = this.makeGen({ ...spec, seed: (spec.seed || deriveSeed(this.config.seed, i)) ^ READ_SEED_SALT }, i);
      return { gen, intervalNs: 1e9 / spec.readsPerSecond, nextAt: Math.max(v.time, this.clockNs) };
    });
    this.flushAllTlbs();
    this.postcopy = new Postcopy(this.slots.values(), missing, this.vcpus.length, reads);
  }

  private endPostcopy(): void {
    this.postcopyDone = this.postcopy;
    this.postcopy = null;
    this.postcopyDone!.arrival.clear();
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
   * The one miss path of every guest write (the workload loop's and
   * GuestWrite's): the TLB missed and the level-3 descriptor is not a
   * writable page, so walk for a writable block, let the hardware set the
   * dirty state of a writable-clean page, or take a stage-2 fault. (lo, hi) is
   * the value being written, t its time. Returns the cost (0 when the walk
   * found a writable leaf); missFaulted and lastFault say whether it faulted
   * and what the fault did.
   */
  /**
   * The miss just taken filled the dirty ring: KVM exits with
   * DIRTY_RING_FULL on the way back into the guest, before the faulting store
   * retires, so it re-executes once the ring is reset; the reset has
   * re-protected its page by then, so it faults and is pushed again. A write
   * KVM emulated (a write-tracked page) has retired already.
   */
  private storeWaitsForRing(): boolean {
    return !(this.missFaulted && this.lastFault!.fault === "tracked");
  }

  /**
   * Post-copy: a page not here yet faults to userfaultfd first, and the
   * write waits for it: the time it waits, or missBlocked when nobody has
   * sent it yet.
   */
  private postcopyWait(v: Vcpu, slot: Memslot, p: number, gfn: number, t: number): number {
    const pc = this.postcopy!;
    if (pc.arrivalOf(slot.id, p) <= t) return 0;
    const go = pc.fault(v, slot, p, gfn * 4096, t);
    if (go !== Infinity) return go - t;
    this.missBlocked = true;
    return 0;
  }

  private writeMiss(v: Vcpu, slot: Memslot, p: number, gfn: number, lo: number, hi: number, t: number, mayBlock: boolean): number {
    this.missFaulted = false;
    this.missTracked = false;
    this.missBlocked = false;
    let wait = this.postcopy === null ? 0 : this.postcopyWait(v, slot, p, gfn, t);
    if (this.missBlocked) return 0;
    const level = slot.s2.leafLevel(p);
    if (level === Level.Block2M || level === Level.Block1G) {
      const [pl, i] = slot.s2.leafRef(p, level);
      if (pl.lo[i] & S2AP_W) {
        v.tlb.fill(gfn);
        return wait;
      }
    } else if (level === Level.Page && this.hw !== null && slot.s2.pte.hi[p] & HI_DBM) {
      // Writable-clean (DBM set, or W with D clear; only ever with an assist on): the hardware's update, no fault.
      this.missTracked = true;
      return wait + this.arch.hardwareDirtyUpdate(this, v, slot, p, gfn);
    }
    if (t + wait < this.hostLockUntil) {
      // The fault needs mmu_lock, which a sync holds: the vCPU stops there until the lock is free
      // (the workload loop resumes it; an explicit write just waits).
      if (mayBlock) {
        this.missBlocked = true;
        return 0;
      }
      wait = this.hostLockUntil - t;
    }
    this.missFaulted = true;
    this.missTracked = true;
    this.lastFault = this.arch.handleWriteFault(this, v, slot, p, gfn, level, lo, hi, t + wait);
    // Other vCPUs hold mmu_lock part of the time (mmu-lock.ts).
    this.lastFault.costNs += this.mmuLock.waitNs;
    return wait + this.lastFault.costNs;
  }

  /**
   * mark_page_dirty_in_slot: a write with a vCPU goes to that vCPU's ring when
   * a ring is configured, otherwise (and for writes without a vCPU) to the
   * slot's bitmap. A page is never recorded in both. Callers make sure a
   * write without a vCPU has a bitmap to go to.
   */
  markPageDirty(v: Vcpu | null, slot: Memslot, p: number): LogTarget {
    if (!slot.logging) return "none";
    if (v?.ring) {
      if (slot.markRingPending(p)) {
        v.ring.push(slot.id, p);
        v.dirtied();
        if (v.ring.softFull) v.ringFull = true;
      }
      return "ring";
    }
    if (slot.markDirty(p)) v?.dirtied();
    return this.ringEnabled ? "backup-bitmap" : "bitmap";
  }

  /**
   * One explicit guest write by vCPU vcpu, through its TLB, as the workload's
   * writes go. A vCPU out with DIRTY_RING_FULL does not run: the write is not
   * performed and says so, as is a write whose own fault fills the ring.
   */
  guestWrite(vcpu: number, gpa: number, value: bigint): GuestWriteOutcome {
    const v = this.vcpu(vcpu, "guest write");
    const slot = this.slotOfGpa(gpa)!;
    if (v.ringFull) return { fault: "none", logged: false, mmio: false, costNs: 0, performed: false, ringFull: true };
    if (slot.readonly) {
      this.arch.vcpuExit(this, v);
      v.count({ mmioExits: 1 });
      return { fault: "none", logged: false, mmio: true, costNs: 0, performed: false, ringFull: false };
    }
    const p = Math.floor((gpa - slot.gpa) / 4096);
    const gfn = slot.baseGfn + p;
    const lo = Number(value & 0xffffffffn) | 0;
    const hi = Number(value >> 32n) | 0;
    let out: WriteOutcome = { fault: "none", logged: false, mmio: false, costNs: 0 };
    if (!v.tlb.holds(gfn)) {
      if ((slot.s2.writable[p >>> 5] >>> (p & 31)) & 1) v.tlb.fill(gfn);
      else {
        const cost = this.writeMiss(v, slot, p, gfn, lo, hi, v.time, false);
        out = this.missFaulted ? { ...this.lastFault! } : { ...out, costNs: cost };
      }
    }
    const faultNs = out.costNs;
    const retires = !(v.ringFull && this.storeWaitsForRing());
    if (retires) {
      slot.content[2 * p] = lo;
      slot.content[2 * p + 1] = hi;
      out.costNs += this.costs.writeNs;
    }
    const exitNs = v.ringFull ? this.costs.userspaceExitNs : 0;
    v.time += out.costNs + exitNs;
    v.count({ writes: retires ? 1 : 0, writeFaults: out.fault === "none" ? 0 : 1, overheadNs: (slot.logging && out.fault !== "none" ? faultNs : 0) + exitNs });
    if (v.ringFull) v.count({ ringFullExits: 1 });
    return { ...out, performed: retires, ringFull: v.ringFull };
  }

  /** Refuses a GuestWrite batch before any of it is applied: every write's vCPU must exist and run, its GPA be in a slot. */
  checkGuestWrites(writes: { vcpu: number; gpa: number }[]): void {
    for (const { vcpu, gpa } of writes) {
      const v = this.vcpu(vcpu, "guest write");
      if (v.paused) throw failedPrecondition(`guest write: vCPU ${vcpu} of VM ${this.name} is paused`);
      if (!this.slotOfGpa(gpa)) throw invalidArgument(`guest write: GPA 0x${gpa.toString(16)} is outside every memslot of VM ${this.name}`);
    }
  }

  /**
   * Writes with no vCPU context (kvm_write_guest from device emulation): the
   * contents change behind stage 2, and the page is logged in the bitmap
   * (with a ring, WITH_BITMAP's backup bitmap). Without a bitmap to go to,
   * KVM would WARN and drop the dirty bit: refused before anything is written.
   */
  hostWrite(writes: { gpa: number; value: bigint }[]): LogTarget[] {
    const targets = writes.map(({ gpa }) => {
      const slot = this.slotOfGpa(gpa);
      if (!slot) throw invalidArgument(`host write: GPA 0x${gpa.toString(16)} is outside every memslot of VM ${this.name}`, "EFAULT");
      if (slot.readonly) throw invalidArgument(`host write: GPA 0x${gpa.toString(16)} is in read-only slot ${slot.id}`, "EFAULT");
      if (slot.logging && this.ringEnabled && !this.ringWithBitmap) {
        throw failedPrecondition(
          `host write: slot ${slot.id} logs to dirty rings and a write without a vCPU has no ring; enable DIRTY_LOG_RING_WITH_BITMAP (KVM would WARN and lose the dirty bit)`,
        );
      }
      return slot;
    });
    return writes.map(({ gpa, value }, k) => {
      const slot = targets[k];
      const p = Math.floor((gpa - slot.gpa) / 4096);
      slot.content[2 * p] = Number(value & 0xffffffffn) | 0;
      slot.content[2 * p + 1] = Number(value >> 32n) | 0;
      return this.markPageDirty(null, slot, p);
    });
  }

  vcpu(index: number, what: string): Vcpu {
    const v = this.vcpus[index];
    if (!v) throw invalidArgument(`${what}: VM ${this.name} has no vCPU ${index} (it has ${this.vcpus.length})`);
    return v;
  }

  // ---- hardware dirty state -----------------------------------------------------------------

  /** kvm_vcpu_mark_page_dirty by frame, for a hardware log that records frames (HDBSS). */
  markGfnDirty(v: Vcpu | null, gfn: number): boolean {
    const slot = this.slotOfGpa(gfn * 4096);
    if (!slot?.logging) return false;
    const before = slot.pagesDirtied;
    this.markPageDirty(v, slot, gfn - slot.baseGfn);
    return slot.pagesDirtied > before;
  }

  /** kvm_unmap_gfn_range over [gpa, gpa + size): dirty state saved, mappings gone, TLBs invalidated. */
  unmapGpaRange(gpa: number, size: number): number {
    if (gpa % 4096 !== 0 || size % 4096 !== 0 || size === 0) throw invalidArgument(`unmap: range 0x${gpa.toString(16)} + ${size} must be whole, non-empty 4 KiB pages`);
    let saved = 0;
    for (const s of this.slots.values()) {
      const p0 = Math.max(0, Math.floor((gpa - s.gpa) / 4096));
      const p1 = Math.min(s.npages, Math.ceil((gpa + size - s.gpa) / 4096));
      if (p0 >= p1) continue;
      const save = s.s2.onDirtyLost;
      s.s2.onDirtyLost = (p) => {
        if (s.markDirty(p)) saved++;
      };
      s.s2.unmapRange(p0, p1);
      s.s2.onDirtyLost = save;
    }
    this.flushAllTlbs();
    return saved;
  }
}
