/**
 * Live migration between two VMs, following QEMU's contract
 * (migration/migration.c, ram.c), as phases run in order:
 *  - setup (phases/setup.ts): check the source, create the destination, turn logging on;
 *  - pre-copy (phases/precopy.ts): round 0 sends every page; each later round
 *    begins with a sync of the dirty state (dirty-sync-count is the round
 *    counter) that the policies (policies/) judge: QEMU's threshold rule
 *    (switch over once bandwidth x downtime limit holds what is dirty),
 *    auto-converge, the optional round cap, KubeVirt's timeouts;
 *  - stop-and-copy (phases/stop-and-copy.ts): pause, final sync, send the
 *    rest, resume the destination; downtime is from the stop to the resume;
 *  - or post-copy (phases/postcopy.ts) when a policy starts it: the
 *    destination resumes at once with the rest missing, and the pages follow;
 *  - verify (phases/verify.ts): the destination at its resume equals the
 *    source at its stop, bit for bit (after post-copy: with every page landed);
 *  - cleanup (phases/cleanup.ts): after success logging and throttle go off;
 *    after any failure or interruption (the signal) the source is resumed if
 *    we paused it, unthrottled, logging is turned off and the destination
 *    we created is destroyed, each with a deadline, and then both sides are
 *    looked at again so that the report says what was observed; a
 *    MigrationError says why.
 */
import { MigrationError, type FailureKind } from "./errors.js";
import { cleanUp, complete } from "./phases/cleanup.js";
import { postcopy } from "./phases/postcopy.js";
import { precopy } from "./phases/precopy.js";
import { prepare, startLogging } from "./phases/setup.js";
import { stopAndCopy } from "./phases/stop-and-copy.js";
import { verify } from "./phases/verify.js";
import { checkAutoConverge } from "./policies/auto-converge.js";
import { checkDirtyLimit } from "./policies/dirty-limit.js";
import { explain } from "./run.js";
import { MechanismError, parseMechanism } from "./trackers/index.js";
import { CHUNK_ALIGN } from "./trackers/tracker.js";
import { DEFAULT_CONFIG, type Endpoints, type MigrationConfig, type MigrationReport } from "./types.js";

export { MigrationError, type FailureKind };
export { explain };
export { DEFAULT_CONFIG };
export type { CleanupReport, Endpoints, MigrationConfig, MigrationReport, ProgressEvent, RoundReport } from "./types.js";

export async function migrate(cfgIn: Partial<MigrationConfig> & Pick<MigrationConfig, "sourceVm" | "destinationVm">, ep: Endpoints): Promise<MigrationReport> {
  const cfg: MigrationConfig = { ...DEFAULT_CONFIG, ...cfgIn };
  validate(cfg);
  const run = await prepare(cfg, ep);
  try {
    await startLogging(run);
    const end = await precopy(run);
    if (end.verdict.kind === "postcopy") await postcopy(run, end);
    else await stopAndCopy(run, end);
    await verify(run);
    await complete(run);
    run.finish();
    run.progress("done", { remainingBytes: 0 });
    return run.report;
  } catch (err) {
    const e = err instanceof MigrationError ? err : explain(err, "migration", "");
    run.report.error = e.message;
    run.report.cleanup = await cleanUp(run);
    run.finish();
    throw new MigrationError(e.kind, e.message, run.report);
  }
}

/** Refuses a configuration no migration could run with (MigrationError "usage"), as the controller's setup would. */
export function validate(cfg: MigrationConfig): void {
  const bad = (m: string) => new MigrationError("usage", m);
  if (!(cfg.bandwidthBitsPerSecond > 0) || !Number.isFinite(cfg.bandwidthBitsPerSecond)) throw bad(`bandwidth must be a positive number of bits/s (got ${cfg.bandwidthBitsPerSecond})`);
  if (!(cfg.latencyNs >= 0)) throw bad(`latency must be >= 0 (got ${cfg.latencyNs} ns)`);
  if (!(cfg.downtimeLimitMs > 0)) throw bad(`downtime limit must be > 0 ms (got ${cfg.downtimeLimitMs})`);
  if (cfg.maxRounds !== null && !(Number.isInteger(cfg.maxRounds) && cfg.maxRounds >= 1)) throw bad(`max rounds must be a whole number >= 1 (got ${cfg.maxRounds})`);
  if (!(cfg.progressTimeoutS > 0)) throw bad(`progress timeout must be > 0 s (got ${cfg.progressTimeoutS})`);
  if (!(cfg.completionTimeoutPerGiBS > 0)) throw bad(`completion timeout must be > 0 s per GiB (got ${cfg.completionTimeoutPerGiBS})`);
  if (!Number.isInteger(cfg.chunkPages) || cfg.chunkPages < CHUNK_ALIGN || cfg.chunkPages % CHUNK_ALIGN !== 0 || cfg.chunkPages > 1 << 20) {
    throw bad(`chunk pages must be a multiple of ${CHUNK_ALIGN} up to 1048576 (got ${cfg.chunkPages})`);
  }
  if (!(cfg.rpcTimeoutMs >= 100) || !Number.isFinite(cfg.rpcTimeoutMs)) throw bad(`RPC timeout must be at least 100 ms (got ${cfg.rpcTimeoutMs})`);
  if (!cfg.sourceVm || !cfg.destinationVm) throw bad("source and destination VM names are required");
  const converge = cfg.autoConverge && checkAutoConverge(cfg.autoConverge);
  if (converge) throw bad(`auto-converge: ${converge}`);
  const limit = cfg.dirtyLimit && checkDirtyLimit(cfg.dirtyLimit);
  if (limit) throw bad(`dirty-limit: ${limit}`);
  const pc = cfg.postcopy;
  if (pc && typeof pc.afterRounds === "number" && !(Number.isInteger(pc.afterRounds) && pc.afterRounds >= 1)) throw bad(`postcopy: after-rounds must be a whole number >= 1 (got ${pc.afterRounds})`);
  if (!["abort", "postcopy", "pause"].includes(cfg.completionTimeoutAction)) throw bad(`completion timeout action must be abort, postcopy or pause (got ${cfg.completionTimeoutAction})`);
  if (cfg.completionTimeoutAction === "postcopy" && !pc) throw bad("a completion timeout that starts post-copy needs post-copy allowed");
  // QEMU's migrate_caps_check: "dirty-limit conflicts with auto-converge".
  if (cfg.autoConverge && cfg.dirtyLimit) throw bad("dirty-limit conflicts with auto-converge: choose one");
  let spec;
  try {
    spec = parseMechanism(cfg.mechanism);
  } catch (e) {
    if (e instanceof MechanismError) throw bad(`mechanism ${e.message}`);
    throw e;
  }
  if (cfg.dirtyLimit && spec.log !== "ring") throw bad(`dirty-limit works through the dirty ring; mechanism ${spec.name} logs to the bitmap (use --mechanism ring)`);
}

