/**
 * QEMU's switchover rule (migration_iteration_run): stop and copy once the
 * bytes still dirty fit in threshold_size = bandwidth x downtime limit.
 */
import { CONTINUE, type Decision, type MigrationPolicy, type SyncState } from "./policy.js";

export class ThresholdPolicy implements MigrationPolicy {
  readonly name = "threshold";
  onSync(s: SyncState): Decision {
    return s.remainingBytes <= s.thresholdBytes ? { kind: "switchover", forced: false } : CONTINUE;
  }
}
