/** PredictMigration over gRPC (dirtytrack.controller.v1): the request checked and turned into the model's input, the prediction back. */
import { invalidArgument } from "../../../common/errors.js";
import type { ServiceHandlers } from "../../../common/grpc.js";
import { MigrationControllerServiceService, type PredictMigrationRequest, type PredictMigrationResponse } from "../../../proto/gen/dirtytrack/controller/v1/controller.js";
import type { CostModel } from "../../../services/hypervisor/model/cost-model.js";
import { MigrationError } from "../errors.js";
import { DEFAULT_CONFIG } from "../migrate.js";
import { QEMU_AUTO_CONVERGE } from "../policies/auto-converge.js";
import { QEMU_DIRTY_LIMIT } from "../policies/dirty-limit.js";
import { MechanismError, parseMechanism } from "../trackers/index.js";
import { predict } from "./model.js";

export const CONTROLLER_PROTO = "dirtytrack/controller/v1/controller.proto";
export const CONTROLLER_SERVICE = "dirtytrack.controller.v1.MigrationControllerService";
/** Rounds a response carries at most (a migration that never converges has thousands). */
const MAX_ROUNDS_OUT = 1000;

function inRange(v: number, what: string, ok: boolean, range: string): number {
  if (!ok) throw invalidArgument(`${what} ${v} must be ${range}`);
  return v;
}

export function predictRequest(req: PredictMigrationRequest, costs: CostModel): PredictMigrationResponse {
  const memoryBytes = Number(req.memoryBytes);
  inRange(memoryBytes, "memory_bytes", memoryBytes >= 2 ** 20 && memoryBytes <= 2 ** 44 && memoryBytes % 4096 === 0, "a multiple of 4 KiB from 1 MiB to 16 TiB");
  inRange(req.vcpus, "vcpus", req.vcpus >= 1 && req.vcpus <= 512, "in [1, 512]");
  const ws = Number(req.workingSetBytes) || memoryBytes;
  inRange(ws, "working_set_bytes", ws >= 4096 && ws <= memoryBytes, "between 4 KiB and memory_bytes (0: all of it)");
  inRange(req.dirtyRateMibps, "dirty_rate_mibps", req.dirtyRateMibps >= 0 && req.dirtyRateMibps <= 1e6, "in [0, 1e6]");
  const ringEntries = req.ringEntries || 4096;
  inRange(ringEntries, "ring_entries", ringEntries >= 256 && ringEntries <= 65536 && (ringEntries & (ringEntries - 1)) === 0, "a power of two in [256, 65536] (0: 4096)");
  let mechanism;
  try {
    mechanism = parseMechanism(req.mechanism || "bitmap");
  } catch (e) {
    if (e instanceof MechanismError) throw invalidArgument(`mechanism ${e.message}`);
    throw e;
  }
  const config = {
    ...DEFAULT_CONFIG,
    mechanism: mechanism.name,
    bandwidthBitsPerSecond: req.bandwidthBitsPerSecond ?? DEFAULT_CONFIG.bandwidthBitsPerSecond,
    latencyNs: req.latencyMs === undefined ? DEFAULT_CONFIG.latencyNs : req.latencyMs * 1e6,
    downtimeLimitMs: req.downtimeLimitMs ?? DEFAULT_CONFIG.downtimeLimitMs,
    autoConverge: req.autoConverge ? QEMU_AUTO_CONVERGE : null,
    dirtyLimit: req.dirtyLimit ? QEMU_DIRTY_LIMIT : null,
    postcopy: req.postcopy ? { afterRounds: null, preempt: false } : null,
  };
  let p;
  try {
    p = predict({ memoryBytes, workingSetBytes: ws, dirtyPagesPerSecond: (req.dirtyRateMibps * 2 ** 20) / 4096, vcpus: req.vcpus, mechanism, ringEntries, config, costs });
  } catch (e) {
    if (e instanceof MigrationError) throw invalidArgument(e.message);
    throw e;
  }
  return {
    converges: p.converges,
    outcome: p.outcome,
    reason: p.reason,
    dirtySyncCount: p.dirtySyncCount,
    totalTimeMs: p.totalTimeMs,
    downtimeMs: p.downtimeMs ?? undefined,
    transferredBytes: BigInt(Math.round(p.transferredBytes)),
    pagePriceNs: p.pagePriceNs,
    trackingSlowdown: p.trackingSlowdown,
    rounds: p.rounds.slice(0, MAX_ROUNDS_OUT).map((r) => ({ round: r.round, startMs: r.startMs, pages: BigInt(r.pages), durationMs: r.durationMs, syncHostMs: r.syncHostMs, cpuThrottlePercentage: r.cpuThrottlePercentage })),
    roundsTotal: p.rounds.length,
  };
}

export function controllerHandlers(costs: CostModel): ServiceHandlers<typeof MigrationControllerServiceService> {
  return {
    predictMigration: (req) => predictRequest(req, costs),
  };
}
