/**
 * Dirty rings, as QEMU drives them (accel/kvm/kvm-all.c): a reaper collects
 * every vCPU's ring while pages are sent (every second, and at once when a
 * vCPU exits with DIRTY_RING_FULL, as QEMU's vCPU thread reaps on that exit),
 * resets the rings, and folds the entries into a bitmap that the next sync
 * hands over. Every sync first kicks every vCPU out of the guest (QEMU's
 * kvm_dirty_ring_flush: hardware logs reach the rings) and reaps; the final one also collects
 * WITH_BITMAP's backup bitmap (writes made without a vCPU).
 */
import type { VmInfo } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import type { HypervisorClient } from "../../../services/hypervisor/client.js";
import { MigrationError } from "../errors.js";
import { setLogging, type DirtyTracker, type SyncResult } from "./tracker.js";

/** QEMU's reaper thread sleeps a second between rounds. */
const REAP_INTERVAL_NS = 1e9;

export class RingTracker implements DirtyTracker {
  readonly name = "ring";
  /**
   * Short steps, so that a vCPU out on a full ring waits at most one step for
   * the reaper (QEMU's vCPU thread reaps at once; the stepped drive can only
   * react between AdvanceVm calls).
   */
  readonly maxStepNs = 5_000_000;
  private enabled: number[] = [];
  private pending = new Map<number, Uint8Array>();
  private sinceReapNs = 0;
  private harvested = 0;
  /** Entries harvested from each vCPU's ring so far (QEMU's cpu->dirty_pages, which its per-vCPU dirty rates come from). */
  private readonly perVcpu: number[];
  private resets = 0;
  private fullReaps = 0;
  private kicks = 0;
  private dirtyLimited = false;
  private reapIntervalNs = REAP_INTERVAL_NS;
  private hostNs = 0;

  constructor(
    private readonly client: HypervisorClient,
    private readonly vm: VmInfo,
    /** A stepped clock: a sync's harvest and reset let the guest run through them (vcpus_run). */
    private readonly vcpusRun = false,
  ) {
    this.perVcpu = vm.vcpus.map(() => 0);
  }

  async start(): Promise<number> {
    if (this.vm.dirtyRingBytes === 0n) {
      throw new MigrationError(
        "precondition",
        `VM '${this.vm.vm}' has no dirty ring; KVM only enables rings before vCPUs exist, so create it with one (dirty_ring)`,
      );
    }
    const { slots, hostNs } = await setLogging(this.client, this.vm, true);
    this.enabled = slots;
    for (const s of this.vm.memslots) {
      if (slots.includes(s.memslot!.slot)) this.pending.set(s.memslot!.slot, new Uint8Array(Math.ceil(Number(s.numPages) / 64) * 8));
    }
    return hostNs;
  }

  /**
   * Harvests every vCPU's ring, folds the entries into the pending bitmaps, resets. Returns host ns,
   * and of it what the guest ran through (vcpusRun: the sync's reap; the reaper thread's reaps are
   * atomic, the guest running beside them anyway).
   */
  private async reap(only?: number[], vcpusRun = false): Promise<{ hostNs: number; guestRanNs: number }> {
    let hostNs = 0;
    let guestRanNs = 0;
    let n = 0;
    for (const v of this.vm.vcpus) {
      if (only && !only.includes(v.index)) continue;
      for (;;) {
        const r = await this.client.harvestDirtyRing({ vm: this.vm.vm, vcpu: v.index, vcpusRun });
        if (r.count === 0) break;
        hostNs += Number(r.hostNs);
        if (r.vcpusRan) guestRanNs += Number(r.hostNs);
        const dv = new DataView(r.entries.buffer, r.entries.byteOffset, r.entries.byteLength);
        for (let i = 0; i < r.count; i++) {
          const bm = this.pending.get(dv.getUint32(i * 16 + 4, true));
          const off = Number(dv.getBigUint64(i * 16 + 8, true));
          if (bm) bm[off >>> 3] |= 1 << (off & 7);
        }
        n += r.count;
        this.perVcpu[v.index] += r.count;
      }
    }
    this.harvested += n;
    if (n > 0) {
      const r = await this.client.resetDirtyRings({ vm: this.vm.vm, vcpusRun });
      this.resets++;
      hostNs += Number(r.hostNs);
      if (r.vcpusRan) guestRanNs += Number(r.hostNs);
    }
    if (!only) this.sinceReapNs = 0;
    this.hostNs += hostNs;
    return { hostNs, guestRanNs };
  }

  async onGuestStep(step: { ringFullVcpus: number[]; stepNs: number }): Promise<void> {
    this.sinceReapNs += step.stepNs;
    if (step.ringFullVcpus.length > 0) {
      this.fullReaps++;
      await this.reap(this.dirtyLimited ? step.ringFullVcpus : undefined);
    } else if (this.sinceReapNs >= this.reapIntervalNs) await this.reap();
  }

  /** Under a dirty limit the reaper thread stands aside and the limit's stat thread syncs every ring each period. */
  limitDirtyRate(periodNs: number): void {
    this.dirtyLimited = true;
    this.reapIntervalNs = periodNs;
  }

  async sync(final: boolean): Promise<SyncResult> {
    // kvm_dirty_ring_flush: every vCPU out of the guest first, so that hardware logs reach the rings.
    const kick = await this.client.kickVcpus({ vm: this.vm.vm });
    this.kicks += kick.kicked;
    const reaped = await this.reap(undefined, this.vcpusRun);
    let hostNs = Number(kick.hostNs) + reaped.hostNs;
    const bitmaps = this.pending;
    this.pending = new Map([...bitmaps].map(([slot, b]) => [slot, new Uint8Array(b.length)]));
    if (final && this.vm.dirtyRingWithBitmap) {
      for (const slot of this.enabled) {
        const r = await this.client.getDirtyLog({ vm: this.vm.vm, slot });
        hostNs += Number(r.hostNs);
        const bm = bitmaps.get(slot)!;
        for (let i = 0; i < bm.length; i++) bm[i] |= r.bitmap[i];
      }
    }
    let dirtyPages = 0;
    for (const bm of bitmaps.values()) for (const b of bm) for (let x = b; x; x &= x - 1) dirtyPages++;
    return { bitmaps, dirtyPages, hostNs, guestRanNs: reaped.guestRanNs, vcpuDirtyPages: [...this.perVcpu] };
  }

  async beforeSend(): Promise<number> {
    return 0;
  }

  async stop(): Promise<void> {
    // Drain the rings first so that no vCPU is left out on a full ring once nobody reaps.
    await this.reap();
    await setLogging(this.client, this.vm, false, this.enabled);
    this.enabled = [];
  }

  stats(): Record<string, number> {
    return { ring_entries_harvested: this.harvested, ring_resets: this.resets, reaps_on_ring_full: this.fullReaps, vcpu_kicks: this.kicks, reaper_host_ms: this.hostNs / 1e6 };
  }
}
