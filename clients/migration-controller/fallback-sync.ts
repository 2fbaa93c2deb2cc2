/**
 * QEMU's auto-converge fallback sync (migration/cpu-throttle.c,
 * cpu_throttle_dirty_sync_timer_tick; QEMU 9.2): every 5 s of guest time,
 * if no sync has happened since the last tick (and the first pass, which
 * copies all memory anyway, is over), the migration thread's bitmap is synced
 * in the middle of the pass, so that auto-converge's trigger is evaluated
 * even when one pass takes long. The pages that sync finds go into the pass
 * where it has not got to yet, and into the next round where it has.
 */
const CPU_THROTTLE_DIRTY_SYNC_TIMESLICE_NS = 5e9;

export class FallbackSyncTimer {
  private nextTickNs: number;
  private syncsAtTick = -1;

  constructor(startNs: number) {
    this.nextTickNs = startNs + CPU_THROTTLE_DIRTY_SYNC_TIMESLICE_NS;
  }

  /** The tick at guest time now, given the syncs so far: whether it syncs. */
  tick(nowNs: number, syncs: number): boolean {
    if (nowNs < this.nextTickNs) return false;
    while (this.nextTickNs <= nowNs) this.nextTickNs += CPU_THROTTLE_DIRTY_SYNC_TIMESLICE_NS;
    // dirty-sync-count here leaves out QEMU's setup sync: 0 is QEMU's 1, the first pass.
    const fire = syncs > 0 && syncs === this.syncsAtTick;
    this.syncsAtTick = fire ? syncs + 1 : syncs;
    return fire;
  }
}
