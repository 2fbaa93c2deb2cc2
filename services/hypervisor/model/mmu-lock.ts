/**
 * Contention for mmu_lock between vCPUs that fault at the same time. On
 * this host's KVM (kvm_pvm, shadow paging, TDP MMU off) a write-protection
 * fault takes the full page-fault path under mmu_lock: two vCPUs faulting at
 * once take 2.85 us per fault each against 2.43 us alone, 1.43 us per page
 * for the VM ([KVM-HERE]). A fault is a parallel part and a serialized part
 * s that one vCPU at a time holds the lock for: alone it costs c = 2.43 us;
 * N vCPUs faulting back to back take max(c, N x s) each (the bottleneck of
 * a closed loop with deterministic times), so the two-vCPU figure gives
 * s = 2.85 / 2 = 1.425 us, and the VM never exceeds 1 / s = 0.70 M faults/s:
 * 96 vCPUs faulting back to back take 137 us per fault each.
 *
 * vCPUs between faults do other work for Z_i (their writes that hit).
 * Each quantum, from what every vCPU did in the previous one, the wait w
 * that each fault adds is the one that keeps the lock within its capacity:
 * the sum over vCPUs of 1 / (c + Z_i + w) equals 1 / s, or w = 0 when the
 * demand fits. A quantum (1 ms) behind, but the vCPUs of a quantum are
 * simulated one after another, so no ordering of their faults exists to
 * queue them on.
 */
export class MmuLock {
  /** What each fault waits for the lock in the current quantum. */
  waitNs = 0;

  constructor(
    /** The uncontended fault (c) and its serialized part (s). */
    private readonly faultNs: number,
    private readonly serialNs: number,
  ) {}

  /**
   * The quantum that ended: each vCPU's faults in it and its time not
   * faulting (running, but not in a fault). Sets the wait of the next one.
   */
  update(vcpus: { faults: number; otherNs: number }[]): void {
    const c = this.faultNs;
    const s = this.serialNs;
    const loops = vcpus.filter((v) => v.faults > 0).map((v) => v.otherNs / v.faults);
    const demand = (w: number) => loops.reduce((n, z) => n + 1 / (c + z + w), 0);
    if (loops.length < 2 || s <= 0 || demand(0) <= 1 / s) {
      this.waitNs = 0;
      return;
    }
    // demand() falls as w grows; at w = N x s it is below 1 / s.
    let lo = 0;
    let hi = loops.length * s;
    for (let i = 0; i < 40; i++) {
      const mid = (lo + hi) / 2;
      if (demand(mid) > 1 / s) lo = mid;
      else hi = mid;
    }
    this.waitNs = hi;
  }
}
