/**
 * Per-vCPU dirty rings (virt/kvm/dirty_ring.c after the 2025 fixes; seed 001).
 *
 * Each entry is struct kvm_dirty_gfn {u32 flags; u32 slot; u64 offset}. Its
 * life: 00 -> 01 (KVM pushes, DIRTY) -> 1X (userspace harvested it, RESET)
 * -> 00 (KVM_RESET_DIRTY_RINGS re-protects the page and frees the entry).
 * A push that brings the ring to its soft limit (entries - 64, less what a
 * hardware log may drain into it at once: PML's 512 on x86) makes the vCPU
 * exit with KVM_EXIT_DIRTY_RING_FULL; it stays out until a reset brings the
 * ring back under the limit. The harvest side (the VMM reading the mmapped
 * ring) is modelled here too, with its fetch index.
 */
import { invalidArgument, failedPrecondition } from "../../../common/errors.js";
import type { MaskedProtect } from "./arch.js";
import { GuestRunsThrough, mayRunThrough } from "./guest-runs-through.js";
import type { Vm } from "./vm.js";

/** With the vCPUs running, the guest runs between chunks of this many entries of a harvest. */
export const HARVEST_CHUNK_ENTRIES = 64;

export const DIRTY_GFN_F_DIRTY = 1 << 0;
export const DIRTY_GFN_F_RESET = 1 << 1;
export const ENTRY_BYTES = 16;
/** KVM_DIRTY_RING_RSVD_ENTRIES. */
export const RSVD_ENTRIES = 64;
/** KVM_DIRTY_RING_MAX_ENTRIES (1 MiB of entries). */
export const MAX_ENTRIES = 65536;
/**
 * kvm_vm_ioctl_enable_dirty_log_ring's checks, in its order; size is args[0]
 * truncated to u32, as the kernel's parameter is. cpuDirtyLogSize is
 * kvm_cpu_dirty_log_size(): 512 with Intel PML, 0 on arm64.
 */
export function checkRingBytes(size: number, ringSet: boolean, vcpusExist: boolean, cpuDirtyLogSize = 0): void {
  const what = "ENABLE_CAP(DIRTY_LOG_RING)";
  const rsvd = RSVD_ENTRIES + cpuDirtyLogSize;
  if (size === 0 || (size & (size - 1)) !== 0) throw invalidArgument(`${what}: ring size ${size} bytes is not a power of two`, "EINVAL");
  if (size < rsvd * ENTRY_BYTES || size < 4096) {
    throw invalidArgument(`${what}: ring size ${size} bytes is smaller than one page or the ${rsvd} reserved entries`, "EINVAL");
  }
  if (size > MAX_ENTRIES * ENTRY_BYTES) throw invalidArgument(`${what}: ${size} bytes is more than ${MAX_ENTRIES} entries (1 MiB)`, "E2BIG");
  if (ringSet) throw failedPrecondition(`${what}: a dirty ring is already configured`, "EINVAL");
  if (vcpusExist) throw failedPrecondition(`${what}: rings can only be enabled before any vCPU is created`, "EINVAL");
}

export class DirtyRing {
  readonly flags: Uint8Array;
  readonly slot: Int32Array;
  readonly offset: Int32Array;
  /** Entries KVM has pushed / reset since creation; their difference is what the ring holds. */
  dirtyIndex = 0;
  resetIndex = 0;
  /** The VMM's harvest position. */
  fetchIndex = 0;
  pushed = 0;
  harvested = 0;
  readonly softLimit: number;

  constructor(
    readonly size: number,
    /** kvm_cpu_dirty_log_size(): entries a hardware log may drain at once, reserved below the soft limit. */
    cpuDirtyLogSize = 0,
  ) {
    this.flags = new Uint8Array(size);
    this.slot = new Int32Array(size);
    this.offset = new Int32Array(size);
    this.softLimit = size - (RSVD_ENTRIES + cpuDirtyLogSize);
  }

  get allocatedBytes(): number {
    return this.flags.byteLength + this.slot.byteLength + this.offset.byteLength;
  }

  /** allocatedBytes of a ring of size entries. */
  static bytesFor(size: number): number {
    return 9 * size;
  }

  get used(): number {
    return this.dirtyIndex - this.resetIndex;
  }

  get softFull(): boolean {
    return this.used >= this.softLimit;
  }

  /** kvm_dirty_ring_push. The vCPU stops at the soft limit, so the ring can never overflow. */
  push(slot: number, offset: number): void {
    if (this.used >= this.size) throw new Error(`dirty ring overflow (${this.used} of ${this.size}): a vCPU ran past its soft limit`);
    const i = this.dirtyIndex & (this.size - 1);
    this.slot[i] = slot;
    this.offset[i] = offset;
    this.flags[i] = DIRTY_GFN_F_DIRTY;
    this.dirtyIndex++;
    this.pushed++;
  }

  /**
   * The VMM's harvest: from its fetch index, every entry KVM has published
   * (DIRTY, not yet RESET), in order, up to max; each is marked RESET and
   * written as struct kvm_dirty_gfn into out (16 bytes each). Returns the count.
   * skipAtWrap is an injected bug: the entry at each wrap-around is marked
   * collected but not reported.
   */
  harvest(max: number, out: DataView | null, skipAtWrap = false): number {
    let n = 0;
    while (n < max) {
      const i = this.fetchIndex & (this.size - 1);
      if ((this.flags[i] & (DIRTY_GFN_F_DIRTY | DIRTY_GFN_F_RESET)) !== DIRTY_GFN_F_DIRTY) break;
      this.flags[i] |= DIRTY_GFN_F_RESET;
      this.fetchIndex++;
      if (skipAtWrap && i === 0 && this.fetchIndex > this.size) continue;
      if (out) {
        out.setUint32(n * ENTRY_BYTES, this.flags[i], true);
        out.setUint32(n * ENTRY_BYTES + 4, this.slot[i], true);
        out.setUint32(n * ENTRY_BYTES + 8, this.offset[i], true);
        out.setUint32(n * ENTRY_BYTES + 12, 0, true);
      }
      n++;
    }
    this.harvested += n;
    return n;
  }

  /** Entries published and not yet harvested. */
  get pending(): number {
    return this.dirtyIndex - this.fetchIndex;
  }

  /**
   * kvm_dirty_ring_reset: frees harvested entries in order, stopping at the
   * first one userspace has not marked RESET, and coalesces runs of the same
   * slot within 64 pages (forwards, or backwards while the mask keeps its top
   * bit) into one mask: protect(slot, first, lo, hi) re-arms pages first + i
   * for each bit i of the mask (lo: bits 0-31, hi: 32-63), span: the highest
   * bit. Returns the entries freed.
   */
  reset(protect: (slot: number, first: number, lo: number, hi: number, span: number) => void): number {
    let cleared = 0;
    let curSlot = -1;
    let base = 0;
    let top = 0;
    let lo = 0;
    let hi = 0;
    let open = false;
    while (this.resetIndex < this.dirtyIndex) {
      const i = this.resetIndex & (this.size - 1);
      if (!(this.flags[i] & DIRTY_GFN_F_RESET)) break;
      const slot = this.slot[i];
      const off = this.offset[i];
      this.flags[i] = 0;
      this.resetIndex++;
      cleared++;
      if (open && slot === curSlot) {
        const d = off - base;
        if (d >= 0 && d < 64) {
          if (d < 32) lo |= 1 << d;
          else hi |= 1 << (d - 32);
          if (d > top) top = d;
          continue;
        }
        if (d < 0 && top - d < 64) {
          const k = -d;
          if (k >= 32) {
            hi = lo << (k - 32);
            lo = 0;
          } else {
            hi = (hi << k) | (lo >>> (32 - k));
            lo <<= k;
          }
          lo |= 1;
          top -= d;
          base = off;
          continue;
        }
      }
      if (open) protect(curSlot, base, lo, hi, top);
      curSlot = slot;
      base = off;
      top = 0;
      lo = 1;
      hi = 0;
      open = true;
    }
    if (open) protect(curSlot, base, lo, hi, top);
    return cleared;
  }
}

function ringOf(vm: Vm, vcpu: number, what: string): DirtyRing {
  const v = vm.vcpu(vcpu, what);
  if (!v.ring) throw failedPrecondition(`${what}: VM ${vm.name} has no dirty ring`, "EINVAL");
  return v.ring;
}

/**
 * QEMU's kvm_cpu_synchronize_kick_all before a sync collects the rings: every
 * running vCPU exits once (its exit flushes a hardware log into its ring) and
 * re-enters, losing an exit's guest time; the caller waits for one exit, as
 * they leave in parallel.
 */
export function kickVcpus(vm: Vm): { kicked: number; hostNs: number } {
  let kicked = 0;
  for (const v of vm.vcpus) {
    if (v.paused) continue;
    vm.arch.vcpuExit(vm, v);
    v.time = Math.max(v.time, vm.clockNs) + vm.costs.userspaceExitNs;
    v.count({ kicks: 1 });
    kicked++;
  }
  return { kicked, hostNs: kicked > 0 ? vm.costs.userspaceExitNs : 0 };
}

/**
 * The VMM reading vCPU vcpu's ring: up to max entries (0: all) as struct
 * kvm_dirty_gfn. With the vCPUs running (vcpusRun) it reads in chunks while
 * the guest goes on, and takes what the vCPU pushes meanwhile too, as a
 * harvester that reads until it meets an entry not yet dirty.
 */
export function harvestRing(vm: Vm, vcpu: number, max: number, vcpusRun = false): { entries: Uint8Array; count: number; hostNs: number; vcpusRan: boolean } {
  const ring = ringOf(vm, vcpu, "harvest dirty ring");
  const perEntry = vm.costs.ringHarvestEntryNs;
  const skip = vm.injected.skipRingEntryAtWrap;
  const limit = Math.min(max || ring.size, ring.size);
  const run = GuestRunsThrough.start(vm, mayRunThrough(vm, vcpusRun), false, limit * perEntry);
  if (!run) {
    const n = Math.min(limit, ring.pending);
    const entries = new Uint8Array(n * ENTRY_BYTES);
    const count = ring.harvest(n, new DataView(entries.buffer), skip);
    return { entries, count, hostNs: count * perEntry, vcpusRan: false };
  }
  const entries = new Uint8Array(limit * ENTRY_BYTES);
  let count = 0;
  while (count < limit) {
    run.at(count * perEntry);
    const got = ring.harvest(Math.min(HARVEST_CHUNK_ENTRIES, limit - count), new DataView(entries.buffer, count * ENTRY_BYTES), skip);
    if (got === 0) break;
    count += got;
  }
  run.end(count * perEntry);
  return { entries: entries.subarray(0, count * ENTRY_BYTES), count, hostNs: count * perEntry, vcpusRan: true };
}

/**
 * KVM_RESET_DIRTY_RINGS: every vCPU's harvested entries are freed and their
 * pages re-armed through the architecture (kvm_reset_dirty_gfn; a mask naming
 * a missing slot or running past its end is skipped, as the kernel does);
 * one VM-wide TLB flush if any. With the vCPUs running (vcpusRun) the guest
 * runs between one vCPU's ring and the next, and before the flush; KVM takes
 * mmu_lock per mask, so faults do not wait.
 */
export function resetDirtyRings(vm: Vm, vcpusRun = false): { cleared: number; tlbFlushed: boolean; hostNs: number; vcpusRan: boolean } {
  if (!vm.ringEnabled) throw failedPrecondition(`RESET_DIRTY_RINGS: VM ${vm.name} has no dirty ring`, "EINVAL");
  const c = vm.costs;
  // Every harvested entry is reset, each its own mask at worst.
  const toReset = vm.vcpus.reduce((n, v) => n + v.ring!.fetchIndex - v.ring!.resetIndex, 0);
  const run = GuestRunsThrough.start(vm, mayRunThrough(vm, vcpusRun), false, c.ioctlNs + toReset * (c.ringResetEntryNs + c.protectMaskedCallNs) + c.tlbFlushNs);
  const protectors = new Map<number, MaskedProtect>();
  let calls = 0;
  const protect = (slotId: number, first: number, lo: number, hi: number, span: number) => {
    calls++;
    const slot = vm.slots.get(slotId);
    if (!slot || first + span >= slot.npages) return;
    let p = protectors.get(slotId);
    if (!p) protectors.set(slotId, (p = vm.arch.protectMasked(vm, slot, false)));
    p.mask(first, lo, hi);
    const rp = slot.ringPending;
    if (rp) for (let k = 0; k <= span; k++) if (((k < 32 ? lo >>> k : hi >>> (k - 32)) & 1) === 1) rp[(first + k) >>> 5] &= ~(1 << ((first + k) & 31));
  };
  let cleared = 0;
  for (const v of vm.vcpus) {
    run?.at(c.ioctlNs + cleared * c.ringResetEntryNs + calls * c.protectMaskedCallNs);
    cleared += v.ring!.reset(protect);
    if (v.ringFull && !v.ring!.softFull) {
      v.ringFull = false;
      // QEMU's vCPU thread sleeps its dirty limit's throttle_us_per_full before it enters the guest again.
      const us = v.dirtyLimit?.throttleUsPerFull ?? 0;
      if (us > 0) v.limitSleepUntil = Math.max(v.time, vm.clockNs) + us * 1000;
    }
  }
  for (const p of protectors.values()) p.done();
  run?.at(c.ioctlNs + cleared * c.ringResetEntryNs + calls * c.protectMaskedCallNs);
  const tlbFlushed = cleared > 0 && vm.flushTlbsAfterWriteProtect();
  const hostNs = c.ioctlNs + cleared * c.ringResetEntryNs + calls * c.protectMaskedCallNs + (tlbFlushed ? c.tlbFlushNs : 0);
  run?.end(hostNs);
  return { cleared, tlbFlushed, hostNs, vcpusRan: run !== null };
}
