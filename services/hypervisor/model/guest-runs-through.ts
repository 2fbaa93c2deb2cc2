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
 * on. Without vcpus_run, or with a hardware assist whose logs change under
 * the loop, the sync is atomic and the caller lets the guest run for its time.
 */
import { failedPrecondition } from "../../../common/errors.js";
import type { Vm } from "./vm.js";

export class GuestRunsThrough {
  private readonly t0: number;

  /** holdsLock: the sync holds mmu_lock for estimateNs from now (known up front: faults wait, so nothing changes its work). */
  constructor(
    private readonly vm: Vm,
    private readonly holdsLock: boolean,
    estimateNs = 0,
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

/** Whether a sync asked to run with the vCPUs running can: a stepped VM with running vCPUs, plain write protection. */
export function guestRunsThrough(vm: Vm, vcpusRun: boolean): boolean {
  if (!vcpusRun) return false;
  if (vm.config.clock !== "stepped") throw failedPrecondition(`vcpus_run: VM ${vm.name} runs on the real-time clock, where the guest runs through every ioctl anyway`, "EINVAL");
  if (vm.advancing) throw failedPrecondition(`vcpus_run: VM ${vm.name} is advancing; one guest run at a time`, "EBUSY");
  return vm.hw === null && vm.vcpus.some((v) => !v.paused);
}
