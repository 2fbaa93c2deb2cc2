import { MemslotFlag, type VmInfo } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import type { HypervisorClient } from "../../../services/hypervisor/client.js";

/**
 * A dirty-tracking mechanism as the migration thread drives it (QEMU's
 * memory_global_dirty_log_start / migration_bitmap_sync / _stop). Each
 * mechanism lives in a file of its own beside this one.
 */
export interface SlotLayout {
  slot: number;
  numPages: number;
}

export interface SyncResult {
  /** Dirty bitmap per slot id, one little-endian bit per page. */
  bitmaps: Map<number, Uint8Array>;
  dirtyPages: number;
  /** Host time the sync cost (the guest keeps running meanwhile). */
  hostNs: number;
  /** Of hostNs, what the guest already ran through (GET with vcpus_run): the clock has moved by it. */
  guestRanNs?: number;
  /** Pages each vCPU has dirtied so far, where the mechanism can tell (the ring's entries); absent otherwise. */
  vcpuDirtyPages?: number[];
}

export interface DirtyTracker {
  readonly name: string;
  /** Turns logging on for every slot; returns host ns. */
  start(): Promise<number>;
  /** Collects what was dirtied since the last sync; `final` is the stop-and-copy sync. */
  sync(final: boolean): Promise<SyncResult>;
  /**
   * Guest time the stepped clock may advance in one call, for mechanisms that
   * must react to the guest (a vCPU out on a full ring); undefined: no limit.
   */
  readonly maxStepNs?: number;
  /** Called while pages travel, after each guest step, with the vCPUs that exited on a full ring (QEMU's reaper and vCPU threads). */
  onGuestStep?(step: { ringFullVcpus: number[]; stepNs: number }): Promise<void>;
  /**
   * A dirty limit is in service from now on: a vCPU out on a full ring has
   * only its own ring reaped, so that the others still fill theirs and sleep
   * (kvm_cpu_exec under dirtylimit_in_service), and every ring is collected
   * once per periodNs (the limit's stat thread) instead of once a second.
   */
  limitDirtyRate?(periodNs: number): void;
  /**
   * Called before the pages selected in `bitmap` (relative to firstPage) are
   * read for sending, so that writes after the read are caught (manual
   * protect's CLEAR). Returns host ns.
   */
  beforeSend(slot: number, firstPage: number, numPages: number, bitmap: Uint8Array): Promise<number>;
  /** Turns logging off and restores what start() changed; safe to call after a failure. */
  stop(): Promise<void>;
  /** Counters the report shows (e.g. ring-full exits), mechanism-specific. */
  stats(): Record<string, number>;
}

/** Chunks sent to CLEAR_DIRTY_LOG and the wire must start on a 64-page boundary. */
export const CHUNK_ALIGN = 64;

/**
 * Turns LOG_DIRTY_PAGES on or off for the given slots of vm (on: every
 * writable slot; read-only slots never change). Returns the slots it changed
 * and the host ns KVM charged.
 */
export async function setLogging(
  client: HypervisorClient,
  vm: VmInfo,
  on: boolean,
  only?: number[],
): Promise<{ slots: number[]; hostNs: number }> {
  const slots: number[] = [];
  let hostNs = 0;
  for (const s of vm.memslots) {
    const m = s.memslot!;
    if (m.flags & MemslotFlag.MEMSLOT_FLAG_READONLY || (only && !only.includes(m.slot))) continue;
    const flags = on ? m.flags | MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES : m.flags & ~MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES;
    const r = await client.setUserMemoryRegion({ vm: vm.vm, memslot: { ...m, flags } });
    slots.push(m.slot);
    hostNs += Number(r.hostNs);
  }
  return { slots, hostNs };
}
