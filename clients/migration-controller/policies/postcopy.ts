/**
 * When to start post-copy (QEMU leaves it to whoever calls
 * migrate-start-postcopy; this is that caller): after a given number of
 * syncs, or when pre-copy stops making progress, i.e. a sync finds no fewer
 * bytes dirty than the one before. QEMU's threshold rule still switches over
 * normally when pre-copy converges first. KubeVirt's way (only at the
 * completion timeout) is the timeouts' policy (kubevirt-timeouts.ts).
 */
import type { PostcopyConfig } from "../types.js";
import { CONTINUE, type Decision, type MigrationPolicy, type SyncState } from "./policy.js";

export class PostcopyPolicy implements MigrationPolicy {
  readonly name = "postcopy";
  private previousRemaining = Infinity;

  constructor(private readonly cfg: PostcopyConfig) {}

  onSync(s: SyncState): Decision {
    const stalled = s.remainingBytes >= this.previousRemaining;
    this.previousRemaining = s.remainingBytes;
    const after = this.cfg.afterRounds;
    const due = after === null ? stalled : after === "completion-timeout" ? false : s.round >= after;
    return due ? { kind: "postcopy" } : CONTINUE;
  }
}
