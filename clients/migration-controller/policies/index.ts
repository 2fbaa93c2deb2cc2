/**
 * The policies a migration runs with, in the order they are asked: the
 * timeouts first (a migration past its deadline fails even if this sync
 * would have switched over), then the ones that act on the guest (QEMU
 * evaluates auto-converge and dirty-limit inside the sync, before the
 * switchover decision),
 * then QEMU's threshold rule, post-copy when allowed (a migration that
 * converges switches over normally), and the optional round cap.
 */
import type { MigrationConfig } from "../types.js";
import { AutoConverge } from "./auto-converge.js";
import { DirtyLimitPolicy } from "./dirty-limit.js";
import { KubevirtTimeouts } from "./kubevirt-timeouts.js";
import { MaxRoundsPolicy } from "./max-rounds.js";
import { PostcopyPolicy } from "./postcopy.js";
import { actsOnGuest, CONTINUE, type Decision, type MigrationPolicy, type SyncState } from "./policy.js";
import { ThresholdPolicy } from "./threshold.js";

export class PolicyChain {
  /** The policies act while pre-copy runs; the switchover is bounded by the threshold instead. */
  active = false;
  constructor(readonly policies: readonly MigrationPolicy[]) {}

  get names(): string[] {
    return this.policies.map((p) => p.name);
  }

  /** What the guest-acting policies ask for at this sync, and the first decision that ends pre-copy (or continue). */
  decide(s: SyncState): { actions: Decision[]; verdict: Decision } {
    const actions: Decision[] = [];
    for (const p of this.policies) {
      const d = p.onSync?.(s) ?? CONTINUE;
      if (actsOnGuest(d)) actions.push(d);
      else if (d.kind !== "continue") return { actions, verdict: d };
    }
    return { actions, verdict: CONTINUE };
  }

  /** A sync in the middle of a pass: only the policies that act on the guest see it; nothing ends there. */
  decideMidPass(s: SyncState): Decision[] {
    return this.policies.filter((p) => p.actsOnGuest).map((p) => p.onSync?.(s) ?? CONTINUE).filter(actsOnGuest);
  }

  onSent(remainingBytes: number, atNs: number): void {
    if (this.active) for (const p of this.policies) p.onSent?.(remainingBytes, atNs);
  }

  nextDeadlineNs(): number {
    if (!this.active) return Infinity;
    return Math.min(Infinity, ...this.policies.map((p) => p.nextDeadlineNs?.() ?? Infinity));
  }

  check(nowNs: number): Decision {
    if (!this.active) return CONTINUE;
    for (const p of this.policies) {
      const d = p.check?.(nowNs) ?? CONTINUE;
      if (d.kind !== "continue") return d;
    }
    return CONTINUE;
  }
}

export function policiesFor(cfg: MigrationConfig, g: { memoryBytes: number; thresholdBytes: number; linkBytesPerSecond: number; startNs: number }): PolicyChain {
  const list: MigrationPolicy[] = [new KubevirtTimeouts(cfg, g.memoryBytes, g.thresholdBytes, g.linkBytesPerSecond)];
  if (cfg.autoConverge) list.push(new AutoConverge(cfg.autoConverge, g.startNs));
  if (cfg.dirtyLimit) list.push(new DirtyLimitPolicy(cfg.dirtyLimit, g.startNs));
  list.push(new ThresholdPolicy());
  if (cfg.postcopy && cfg.postcopy.afterRounds !== "completion-timeout") list.push(new PostcopyPolicy(cfg.postcopy));
  if (cfg.maxRounds !== null) list.push(new MaxRoundsPolicy(cfg.maxRounds));
  return new PolicyChain(list);
}
