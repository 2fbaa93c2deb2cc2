/**
 * `migration-controller predict`: the outcome of a migration from given
 * numbers, from a dirty-rate measurement (`estimate --json`), or from a
 * running VM measured on the spot; `--check` migrates a guest built from the
 * same numbers and prints the prediction beside what happened.
 */
import { readFileSync } from "node:fs";
import { writeFile } from "node:fs/promises";
import type { Io } from "../../../common/io.js";
import { parseBytes } from "../../../common/config.js";
import { DirtyRateMode, Workload, WorkloadPattern } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { connectHypervisor } from "../../../services/hypervisor/client.js";
import { loadCostModel } from "../../../services/hypervisor/model/cost-model.js";
import { runComparison, type CellResult } from "../compare/run.js";
import { checkOutputs, clientOptions, EXIT, number, policy, UsageError, type Values } from "../flags.js";
import { POLICY, SECURITY } from "../options.js";
import type { CommandSpec } from "../program.js";
import { formatBytes } from "../report.js";
import { archOf, parseMechanism } from "../trackers/index.js";
import { predict, type Prediction, type PredictInput } from "./model.js";

export const PREDICT_COMMAND: CommandSpec = {
  name: "predict",
  summary: "predict a migration's rounds, time, downtime and whether it converges (--check: and run it)",
  description:
    "Predicts a pre-copy migration's syncs, total time, downtime and whether it converges, from the guest's numbers, from `estimate --json`, or by measuring a running VM; the controller's own policies decide at each predicted sync.",
  groups: [
    [
      "The guest and its writes:",
      [
        "memory",
        "vcpus",
        "working-set",
        "dirty-rate",
        "from-estimate",
        ["source", "measure a running VM on this hypervisor instead, with --vm (env: MIGRATION_SOURCE; default: 127.0.0.1:50051)"],
        ["vm", "the running VM to measure (page-sampling, 1 s; its memory and vCPUs from the hypervisor)"],
        "ring-entries",
      ],
    ],
    ["Policy and link (as for migrate):", POLICY],
    ["Security:", SECURITY],
    ["Output:", ["check", ["json", "write the prediction (and the check) as JSON"]]],
  ],
  after: "exit codes: 0 predicted (with --check: and converge-or-not matched); 1 --check disagreed on converging; 2 bad usage",
  run: (v, io) => runPredict(v, io),
};

interface Numbers {
  memoryBytes: number;
  vcpus: number;
  workingSetBytes: number;
  dirtyPagesPerSecond: number;
  /** Where the rate came from, for the output. */
  source: string;
}

const MiB = 2 ** 20;

/** The rate measured over calcTime as the initial rate: the distinct-page count saturates over a working set of W pages. */
function initialRate(measuredPagesPerSecond: number, calcTimeS: number, workingSetPages: number): number {
  const seen = measuredPagesPerSecond * calcTimeS;
  if (seen >= workingSetPages) return measuredPagesPerSecond;
  return (-workingSetPages * Math.log(1 - seen / workingSetPages)) / calcTimeS;
}

async function numbers(v: Values, io: Io): Promise<Numbers> {
  const bytes = (flag: "memory" | "working-set", text: string) => {
    try {
      return parseBytes(text);
    } catch (e) {
      throw new UsageError(`--${flag}: ${(e as Error).message}`);
    }
  };
  const given = [v["dirty-rate"] !== undefined && "--dirty-rate", v["from-estimate"] !== undefined && "--from-estimate", v.vm !== undefined && "--vm"].filter(Boolean);
  if (given.length !== 1) throw new UsageError(given.length ? `${given.join(" and ")}: give one source of the dirty rate` : "give the dirty rate: --dirty-rate MIBPS, --from-estimate FILE, or --source ADDR --vm NAME");
  if (v.vm !== undefined) {
    for (const f of ["memory", "vcpus"] as const) if (v[f] !== undefined) throw new UsageError(`--${f} comes from the VM with --vm`);
    const hv = connectHypervisor(v.source ?? io.env.MIGRATION_SOURCE ?? "127.0.0.1:50051", clientOptions(v, io, { rpcTimeoutMs: 30_000 }));
    try {
      const vm = (await hv.getVm({ vm: v.vm })).vm!;
      const info = (await hv.calcDirtyRate({ vm: v.vm, calcTimeMs: 1000, samplePages: 512, mode: DirtyRateMode.DIRTY_RATE_MODE_PAGE_SAMPLING })).info!;
      const memoryBytes = Number(vm.memoryBytes);
      const ws = v["working-set"] === undefined ? memoryBytes : bytes("working-set", v["working-set"]);
      const measured = (Number(info.dirtyRate) * MiB) / 4096;
      return { memoryBytes, vcpus: vm.vcpus.length, workingSetBytes: ws, dirtyPagesPerSecond: initialRate(measured, 1, ws / 4096), source: `measured on ${v.vm} (page-sampling, 1 s): ${info.dirtyRate} MiB/s` };
    } catch (e) {
      const err = e as { details?: string; message?: string };
      throw new UsageError(`--vm ${v.vm}: ${err.details ?? err.message}`);
    } finally {
      hv.close();
    }
  }
  const memoryBytes = bytes("memory", v.memory ?? "4GiB");
  if (memoryBytes < MiB || memoryBytes % 4096 !== 0) throw new UsageError(`--memory ${v.memory}: must be a multiple of 4 KiB and at least 1 MiB`);
  const vcpus = number(v.vcpus, "vcpus", 4, (n) => Number.isInteger(n) && n >= 1 && n <= 512, "a whole number in [1, 512]");
  const ws = v["working-set"] === undefined ? memoryBytes : bytes("working-set", v["working-set"]);
  if (!(ws >= 4096 && ws <= memoryBytes)) throw new UsageError(`--working-set ${v["working-set"]}: must be between 4 KiB and --memory`);
  if (v["dirty-rate"] !== undefined) {
    const mibps = number(v["dirty-rate"], "dirty-rate", 0, (n) => n >= 0 && n <= 1e6, "MiB/s in [0, 1e6]");
    return { memoryBytes, vcpus, workingSetBytes: ws, dirtyPagesPerSecond: (mibps * MiB) / 4096, source: `given: ${mibps} MiB/s` };
  }
  const file = v["from-estimate"]!;
  let j: { "dirty-rate"?: unknown; "calc-time"?: unknown };
  try {
    j = JSON.parse(readFileSync(file, "utf8"));
  } catch (e) {
    throw new UsageError(`--from-estimate ${file}: ${(e as Error).message}`);
  }
  const rate = j["dirty-rate"];
  const calc = j["calc-time"];
  if (typeof rate !== "number" || !(rate >= 0) || typeof calc !== "number" || !(calc > 0)) throw new UsageError(`--from-estimate ${file}: not the JSON of estimate --json (needs "dirty-rate" in MiB/s and "calc-time" in ms)`);
  const measured = (rate * MiB) / 4096;
  return { memoryBytes, vcpus, workingSetBytes: ws, dirtyPagesPerSecond: initialRate(measured, calc / 1e3, ws / 4096), source: `from ${file}: ${rate} MiB/s over ${calc} ms` };
}

const s = (ms: number) => `${(ms / 1e3).toFixed(2)} s`;

export function describePrediction(p: Prediction, n: Numbers, input: PredictInput): string {
  const lines = [
    `predicted: ${p.converges ? "converges" : "does NOT converge"}: ${p.reason}`,
    `  ${p.dirtySyncCount} syncs, total ${s(p.totalTimeMs)}, downtime ${p.downtimeMs === null ? "-" : `${p.downtimeMs.toFixed(1)} ms`}, ${formatBytes(p.transferredBytes)} sent`,
    `  the guest: ${formatBytes(n.memoryBytes)}, ${n.vcpus} vCPUs, working set ${formatBytes(n.workingSetBytes)}, dirty rate ${((n.dirtyPagesPerSecond * 4096) / MiB).toFixed(1)} MiB/s untracked (${n.source})`,
    `  the model: pre-copy's geometric series, the dirty pages saturating over the working set; ${input.mechanism.name} charges ${Math.round(p.pagePriceNs)} ns per newly dirtied page ` +
      `(${(100 * p.trackingSlowdown).toFixed(1)}% fewer pages dirtied per second while tracked); the policies are the controller's own (${input.config.autoConverge ? "auto-converge, " : ""}${input.config.dirtyLimit ? "dirty-limit, " : ""}${input.config.postcopy ? "post-copy, " : ""}threshold, KubeVirt's timeouts)`,
    "  round   start s      pages  duration ms  sync host ms  throttle %",
  ];
  for (const r of p.rounds.slice(0, 12)) lines.push(`  ${String(r.round).padStart(5)}  ${(r.startMs / 1e3).toFixed(2).padStart(7)}  ${String(r.pages).padStart(9)}  ${r.durationMs.toFixed(1).padStart(11)}  ${r.syncHostMs.toFixed(2).padStart(12)}  ${String(r.cpuThrottlePercentage).padStart(10)}`);
  if (p.rounds.length > 12) lines.push(`  ... ${p.rounds.length - 12} more rounds`);
  return lines.join("\n");
}

const pct = (predicted: number, actual: number) => (actual === 0 ? "-" : `${predicted >= actual ? "+" : ""}${((100 * (predicted - actual)) / actual).toFixed(1)}%`);

export function describeCheck(p: Prediction, c: CellResult): string {
  const converged = c.status === "completed" && c.verified;
  return [
    `simulated: ${converged ? "converged" : `did NOT converge (${c.error})`}; ${c.dirtySyncCount} syncs, total ${s(c.totalTimeMs)}, downtime ${c.downtimeMs === null ? "-" : `${c.downtimeMs.toFixed(1)} ms`}, ${formatBytes(c.transferredBytes)} sent`,
    `error: converge ${p.converges === converged ? "matches" : "DIFFERS"}; syncs ${p.dirtySyncCount - c.dirtySyncCount >= 0 ? "+" : ""}${p.dirtySyncCount - c.dirtySyncCount}; ` +
      `total ${pct(p.totalTimeMs, c.totalTimeMs)}` +
      (p.downtimeMs !== null && c.downtimeMs !== null ? `; downtime ${pct(p.downtimeMs, c.downtimeMs)}` : ""),
  ].join("\n");
}

export async function runPredict(v: Values, io: Io): Promise<number> {
  const cfg = policy(v);
  const mechanism = parseMechanism(cfg.mechanism);
  const ringEntries = number(v["ring-entries"], "ring-entries", 4096, (n) => Number.isInteger(n) && n >= 256 && n <= 65536 && (n & (n - 1)) === 0, "a power of two in [256, 65536]");
  if (v.check && v.vm !== undefined) throw new UsageError("--check migrates a guest built from the numbers; with --vm it would be a copy of nothing: give --dirty-rate or --from-estimate");
  checkOutputs(v);
  const n = await numbers(v, io);
  const input: PredictInput = { ...n, mechanism, ringEntries, config: cfg, costs: loadCostModel(io.env.HYPERVISOR_COST_MODEL) };
  const p = predict(input);
  io.out.write(describePrediction(p, n, input) + "\n");
  let check: CellResult | undefined;
  if (v.check) {
    io.err.write("checking: migrating a guest built from these numbers on two local hypervisors\n");
    const pages = n.workingSetBytes / 4096;
    const arch = archOf(mechanism) === "x86_64" ? "x86_64" : "arm64";
    const workload = Workload.fromPartial({ pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, writesPerSecond: n.dirtyPagesPerSecond / n.vcpus, workingSetPages: BigInt(pages) });
    const ran = await runComparison({
      guest: { memoryBytes: n.memoryBytes, vcpus: n.vcpus, backing: "4k", workload, noisyWritesPerSecond: null, vcpuWorkloads: null, seed: 1, ringEntries },
      cells: [{ index: 0, arch, mechanism, policy: "predict", config: cfg }],
      jobs: 1,
    });
    check = ran.results[0];
    io.out.write(describeCheck(p, check) + "\n");
  }
  if (v.json) {
    const json = {
      converges: p.converges,
      outcome: p.outcome,
      reason: p.reason,
      "dirty-sync-count": p.dirtySyncCount,
      "total-time": p.totalTimeMs,
      downtime: p.downtimeMs,
      ram: { transferred: p.transferredBytes },
      "page-price": p.pagePriceNs,
      "tracking-slowdown": p.trackingSlowdown,
      rounds: p.rounds.map((r) => ({ round: r.round, start: r.startMs, pages: r.pages, duration: r.durationMs, "sync-host-time": r.syncHostMs, "cpu-throttle-percentage": r.cpuThrottlePercentage })),
      ...(check ? { check: { converged: check.status === "completed" && check.verified, error: check.error, "dirty-sync-count": check.dirtySyncCount, "total-time": check.totalTimeMs, downtime: check.downtimeMs, ram: { transferred: check.transferredBytes } } } : {}),
      units: { "total-time": "ms (guest time)", downtime: "ms", "ram.transferred": "bytes", "page-price": "ns per newly dirtied page, charged to the vCPU", "tracking-slowdown": "fraction 0-1", "rounds[].start": "ms", "rounds[].duration": "ms", "rounds[].sync-host-time": "ms" },
    };
    await writeFile(v.json, JSON.stringify(json, null, 2) + "\n");
  }
  return check && (check.status === "completed" && check.verified) !== p.converges ? EXIT.failed : EXIT.ok;
}
