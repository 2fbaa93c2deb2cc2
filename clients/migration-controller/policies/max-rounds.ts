/**
 * A round cap (QEMU has none): after this many syncs the switchover is
 * forced whatever is still dirty, as Xen's last iteration at DEF_MAX_ITERS
 * and Cloud Hypervisor's MAX_DIRTY_MIGRATIONS force it.
 */
import { CONTINUE, type Decision, type MigrationPolicy, type SyncState } from "./policy.js";

export class MaxRoundsPolicy implements MigrationPolicy {
  readonly name = "max-rounds";
  constructor(private readonly maxRounds: number) {}
  onSync(s: SyncState): Decision {
    return s.round >= this.maxRounds ? { kind: "switchover", forced: true } : CONTINUE;
  }
}
