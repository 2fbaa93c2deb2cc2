/**
 * QEMU's dirty-limit capability (QEMU 8.1; migration/ram.c
 * migration_dirty_limit_guest): when the throttle trigger fires
 * (throttle-trigger.ts), every vCPU gets the dirty page rate limit
 * vcpu-dirty-limit (MB/s), measured every x-vcpu-dirty-limit-period; the
 * hypervisor then holds each vCPU at it by sleeping after its full rings
 * (services/hypervisor/model/dirty-limit.ts). It works through the dirty ring
 * and is refused without one, and it excludes auto-converge, as QEMU's
 * capability checks do. Once set, the limit stays until the migration ends.
 */
import type { DirtyLimitConfig } from "../types.js";
import { CONTINUE, type Decision, type MigrationPolicy, type SyncState } from "./policy.js";
import { ThrottleTrigger } from "./throttle-trigger.js";

export type { DirtyLimitConfig };

/** QEMU's defaults (migration/options.c). */
export const QEMU_DIRTY_LIMIT: DirtyLimitConfig = {
  throttleTriggerThreshold: 50,
  vcpuDirtyLimitMBps: 1,
  periodMs: 1000,
};

/** Why a configuration is refused, naming QEMU's parameter; null when it is valid. */
export function checkDirtyLimit(c: DirtyLimitConfig): string | null {
  if (!(Number.isInteger(c.throttleTriggerThreshold) && c.throttleTriggerThreshold >= 1 && c.throttleTriggerThreshold <= 100)) {
    return `throttle-trigger-threshold must be a whole number in [1, 100] (got ${c.throttleTriggerThreshold})`;
  }
  if (!(Number.isSafeInteger(c.vcpuDirtyLimitMBps) && c.vcpuDirtyLimitMBps >= 1)) return `vcpu-dirty-limit must be a whole number of MB/s >= 1 (got ${c.vcpuDirtyLimitMBps})`;
  if (!(Number.isInteger(c.periodMs) && c.periodMs >= 1 && c.periodMs <= 1000)) return `x-vcpu-dirty-limit-period must be a whole number of ms in [1, 1000] (got ${c.periodMs})`;
  return null;
}

export class DirtyLimitPolicy implements MigrationPolicy {
  readonly name = "dirty-limit";
  readonly actsOnGuest = true;
  private readonly fire: ThrottleTrigger;
  /** The limit in service (0: none yet). */
  limitMBps = 0;

  constructor(
    private readonly cfg: DirtyLimitConfig,
    startNs: number,
  ) {
    this.fire = new ThrottleTrigger(cfg.throttleTriggerThreshold, startNs);
  }

  onSync(s: SyncState): Decision {
    const fired = this.fire.onSync(s.nowNs, s.dirtyPages, s.transferredBytes);
    // migration_dirty_limit_guest does nothing while the same quota is in service.
    if (!fired || this.limitMBps === this.cfg.vcpuDirtyLimitMBps) return CONTINUE;
    this.limitMBps = this.cfg.vcpuDirtyLimitMBps;
    return { kind: "dirty-limit", mbPerSecond: this.limitMBps };
  }
}
