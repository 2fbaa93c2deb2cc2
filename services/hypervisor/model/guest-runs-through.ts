/**
 * A sync with the vCPUs running through it (a stepped VM asked with
 * vcpus_run): on a host the guest goes on while the VMM collects the log, so
 * the sync's host time passes on the VM's clock and the guest runs between
 * its steps: GET's and CLEAR's word loops in chunks (dirty-bitmap.ts), a
 * ring's harvest in chunks of entries and a reset ring by ring
 * (dirty-ring.ts), each also between its last re-protection and the TLB flush
 * (seed 004's window). A sync that holds mmu_lock throughout (GET, CLEAR)
 * makes a fault wait until it ends (Vm.hostLockUntil); one that takes it per
 * mask (a ring reset) or not at all (a harvest, in userspace) lets faults go
 * on. Without vcpus_run, with a hardware assist whose logs change under
 * the loop, or when the guest work it would simulate is over
 * MAX_RUN_THROUGH_WRITES, the sync is atomic (vcpus_ran false) and the
 * caller lets the guest run for its time.
 */
import { failedPrecondition } from "../../../common/errors.js";
import type { Vm } from "./vm.js";

/**
 * The most guest writes one sync may simulate while it runs (every running
 * vCPU at its workload's rate, over the sync's estimated host time): one
 * call is synchronous, so this bounds the event-loop time it can take (about
 * 0.15 s at the bench's 30 M writes/s). Beyond it the sync is atomic, and the
 * guest runs after it, in AdvanceVm's slices. Counted, not timed, so that a
 * run stays deterministic for its seed.
 */
export const MAX_RUN_THROUGH_WRITES = 4_000_000;

export class GuestRunsThrough {
  private readonly t0: number;

  /**
   * The run of a sync estimated to take estimateNs of host time, or null for
   * an atomic one (vcpusRun refused by mayRunThrough, or too much guest work).
   * holdsLock: the sync holds mmu_lock throughout (known up front: faults wait, so nothing changes its work).
   */
  static start(vm: Vm, allowed: boolean, holdsLock: boolean, estimateNs: number): GuestRunsThrough | null {
    if (!allowed) return null;
    const rate = vm.vcpus.reduce((n, v) => n + (!v.paused && v.gen.active ? v.gen.peakWritesPerSecond : 0), 0);
    return (rate * estimateNs) / 1e9 <= MAX_RUN_THROUGH_WRITES ? new GuestRunsThrough(vm, holdsLock, estimateNs) : null;
  }

  private constructor(
    private readonly vm: Vm,
    private readonly holdsLock: boolean,
    estimateNs: number,
  ) {
    this.t0 = vm.clockNs;
    if (holdsLock) vm.hostLockUntil = this.t0 + estimateNs;
  }

  /** The guest runs until the sync is elapsedNs in. */
  at(elapsedNs: number): void {
    const target = this.t0 + elapsedNs;
    if (target > this.vm.clockNs) this.vm.advance(target - this.vm.clockNs);
  }

  /** The sync ends after hostNs (the estimate less what did not happen: a skipped flush, plus any split): the lock is free, the guest runs to there. */
  end(hostNs: number): void {
    if (this.holdsLock) this.vm.hostLockUntil = this.t0 + hostNs;
    this.at(hostNs);
  }
}

/**
 * Whether a sync asked to run with the vCPUs running can: a stepped VM with
 * running vCPUs, plain write protection. Checked before the sync touches
 * anything, so that a refusal loses nothing.
 */
export function mayRunThrough(vm: Vm, vcpusRun: boolean): boolean {
  if (!vcpusRun) return false;
  if (vm.config.clock !== "stepped") throw failedPrecondition(`vcpus_run: VM ${vm.name} runs on the real-time clock, where the guest runs through every ioctl anyway`, "EINVAL");
  if (vm.advancing) throw failedPrecondition(`vcpus_run: VM ${vm.name} is advancing; one guest run at a time`, "EBUSY");
  return vm.hw === null && vm.vcpus.some((v) => !v.paused);
}
