/**
 * `migration-controller compare`: the matrix from the flags (each axis a
 * comma-separated list), the cells run, the ranked table on stdout, and the
 * JSON and HTML files. Exit 0 when every cell migrated and verified, 1 when
 * one failed (the table shows why), 2 for a matrix that cannot run.
 */
import { availableParallelism } from "node:os";
import { writeFile } from "node:fs/promises";
import type { Io } from "../../../common/io.js";
import { formatBytes } from "../report.js";
import {
  AUTO_CONVERGE_FLAGS,
  checkOutputs,
  clientOptions,
  DIRTY_LIMIT_FLAGS,
  EXIT,
  guestSpec,
  interruptOnSignals,
  number,
  policy,
  POSTCOPY_FLAGS,
  SIGNAL_EXIT,
  UsageError,
  type Values,
} from "../flags.js";
import { DEFAULT_CONFIG } from "../migrate.js";
import { GUEST, POLICY_PARAMETERS, SECURITY } from "../options.js";
import type { CommandSpec } from "../program.js";
import { mechanismsByArch, MatrixError, POLICIES, splitAxis, type Arch, type Cell, type CellConfig } from "./matrix.js";
import { label, compareJson, compareTable, rank, RANK_BY, type RankBy } from "./table.js";
import { checkBudget, runComparison } from "./run.js";
import { compareHtml } from "./html.js";

export const COMPARE_COMMAND: CommandSpec = {
  name: "compare",
  summary: "run a matrix of mechanisms, policies and links on one guest and rank them",
  description:
    "Runs a matrix of mechanisms, policies and links on one guest and ranks them: every cell creates the same guest from the same seed, migrates it to a second VM on the same hypervisor, verifies it and removes both. The cells run in parallel on hypervisors started here (--jobs) or on running ones (--hypervisors).",
  groups: [
    [
      "The matrix (each axis a comma-separated list):",
      [
        ["mechanism", "mechanisms as for demo, or all: every valid one of each architecture (default: all)"],
        ["arch", "arm64, x86_64 (default: each mechanism on every architecture that has it; given, every mechanism must exist on every architecture listed)"],
        "policies",
        ["bandwidth", "link bandwidths as for demo (default: 10Gbit)"],
        ["latency", "link latencies; a bare number is ms (default: 0.1ms)"],
        ["downtime-limit", "downtime limits; a bare number is ms (default: 300ms)"],
      ],
    ],
    ["Where the cells run:", ["jobs", "hypervisors", "shard", ["rank-by", `the figure the table ranks by: ${Object.keys(RANK_BY).join(" | ")} (default: downtime)`]]],
    ["The guest (as for demo):", GUEST.filter((f) => f !== "arch")],
    ["The policies' parameters (each applies to the cells of its policy):", POLICY_PARAMETERS],
    ["Security:", SECURITY],
    ["Output:", [["json", "write one record per cell as JSON (QEMU's names, units)"], ["report", "write an HTML page with the table and charts of every cell"], "quiet"]],
  ],
  // Accepted only to say that compare takes the policies as an axis.
  hidden: ["auto-converge", "dirty-limit", "postcopy", "policy"],
  after: "exit codes: 0 every cell migrated and verified; 1 a cell failed (the table says why); 2 a matrix that cannot run; 130/143 interrupted",
  run: (v, io) => runCompare(v, io),
};

const POLICY_PARAMS: Record<string, readonly string[]> = {
  "auto-converge": AUTO_CONVERGE_FLAGS,
  "dirty-limit": DIRTY_LIMIT_FLAGS,
  postcopy: POSTCOPY_FLAGS,
};

/** The flags of one policy cell: the policy's switch on, other policies' parameters off. */
function cellFlags(v: Values, p: string, link: { bandwidth: string; latency: string; "downtime-limit": string }): Values {
  const c: Record<string, unknown> = { ...v, ...link, mechanism: undefined };
  for (const [name, params] of Object.entries(POLICY_PARAMS)) if (name !== p) for (const f of params) delete c[f];
  if (p !== "auto-converge" && p !== "dirty-limit") delete c["throttle-trigger-threshold"];
  if (p === "auto-converge" || p === "dirty-limit" || p === "postcopy") c[p] = true;
  else if (p !== "none") c.policy = p;
  return c as Values;
}

/** The cells of the matrix the flags describe. */
export function cellsFromFlags(v: Values): Cell[] {
  for (const f of ["auto-converge", "dirty-limit", "postcopy", "policy"] as const) {
    if (v[f] !== undefined) throw new UsageError(`--${f}: compare takes its policies as one axis: --policies ${POLICIES.join(",")} (or MigrationPolicy files)`);
  }
  const policies = splitAxis("policies", v.policies, ["none"]);
  for (const [name, params] of Object.entries(POLICY_PARAMS)) {
    const given = params.find((f) => v[f as keyof Values] !== undefined);
    if (given && !policies.includes(name)) throw new UsageError(`--${given} needs ${name} in --policies`);
  }
  if (v["throttle-trigger-threshold"] !== undefined && !policies.some((p) => p === "auto-converge" || p === "dirty-limit")) {
    throw new UsageError("--throttle-trigger-threshold needs auto-converge or dirty-limit in --policies");
  }
  const archs = v.arch === undefined ? null : (splitAxis("arch", v.arch, []) as Arch[]);
  const pairs = mechanismsByArch(splitAxis("mechanism", v.mechanism, ["all"]), archs);
  const bandwidths = splitAxis("bandwidth", v.bandwidth, [String(DEFAULT_CONFIG.bandwidthBitsPerSecond)]);
  const latencies = splitAxis("latency", v.latency, [String(DEFAULT_CONFIG.latencyNs / 1e6)]);
  const limits = splitAxis("downtime-limit", v["downtime-limit"], [String(DEFAULT_CONFIG.downtimeLimitMs)]);
  const configs: { policy: string; config: CellConfig }[] = [];
  for (const p of policies) {
    for (const bandwidth of bandwidths) for (const latency of latencies) for (const dl of limits) configs.push({ policy: p, config: policy(cellFlags(v, p, { bandwidth, latency, "downtime-limit": dl })) });
  }
  const cells: Cell[] = [];
  for (const { arch, mechanism } of pairs) for (const c of configs) cells.push({ index: cells.length, arch, mechanism, policy: c.policy, config: { ...c.config, mechanism: mechanism.name } });
  return cells;
}

/** --shard K/N: the cells whose matrix index is K modulo N (a Kubernetes Indexed Job's share: K from JOB_COMPLETION_INDEX). */
function shardOf(cells: Cell[], text: string | undefined): Cell[] {
  if (text === undefined) return cells;
  const m = /^(\d+)\/(\d+)$/.exec(text.trim());
  const [k, n] = m ? [Number(m[1]), Number(m[2])] : [NaN, NaN];
  if (!(n >= 1 && k >= 0 && k < n)) throw new UsageError(`--shard ${text}: must be K/N with 0 <= K < N (e.g. 0/4)`);
  const mine = cells.filter((c) => c.index % n === k);
  if (mine.length === 0) throw new UsageError(`--shard ${text}: no cell of the ${cells.length} falls in it`);
  return mine;
}

/** A matrix that cannot run is a usage error (exit 2). */
function matrixError<T>(fn: () => T): T {
  try {
    return fn();
  } catch (e) {
    if (e instanceof MatrixError) throw new UsageError(e.message);
    throw e;
  }
}

export async function runCompare(v: Values, io: Io): Promise<number> {
  const { cells, guest, addresses, jobs } = matrixError(() => {
    const cells = shardOf(cellsFromFlags(v), v.shard);
    const guest = guestSpec({ ...v, arch: undefined, mechanism: undefined }, null);
    const addresses = v.hypervisors === undefined ? undefined : splitAxis("hypervisors", v.hypervisors, []);
    if (addresses && v.jobs !== undefined) throw new UsageError("--jobs and --hypervisors: give one (with --hypervisors, one cell runs at a time on each)");
    const jobs = number(v.jobs, "jobs", availableParallelism(), (n) => Number.isInteger(n) && n >= 1 && n <= 64, "a whole number in [1, 64]");
    checkBudget({ guest, cells, jobs, addresses });
    return { cells, guest, addresses, jobs };
  });
  const by = (v["rank-by"] ?? "downtime") as RankBy;
  if (!(by in RANK_BY)) throw new UsageError(`--rank-by ${v["rank-by"]}: must be one of ${Object.keys(RANK_BY).join(", ")}`);
  checkOutputs(v);
  const say = (s: string) => v.quiet || io.err.write(`${s}\n`);
  const where = addresses ? `on ${addresses.join(", ")}` : `on ${Math.min(jobs, cells.length)} hypervisor process${Math.min(jobs, cells.length) > 1 ? "es" : ""} on 127.0.0.1`;
  const guestText = `${formatBytes(guest.memoryBytes)}, ${guest.vcpus} vCPUs, ${guest.backing} backing, ${v.workload ?? "hot-cold"} workload, seed ${guest.seed}`;
  say(`comparing ${cells.length} cells (${guestText}) ${where}`);
  const interrupt = interruptOnSignals();
  try {
    const opts = clientOptions(v, io, { rpcTimeoutMs: Math.max(...cells.map((c) => c.config.rpcTimeoutMs)) });
    const ran = await runComparison({
      guest,
      cells,
      jobs,
      addresses,
      clientOptions: opts,
      signal: interrupt.signal,
      onCell: (r, done, of) =>
        say(`[${done}/${of}] ${label(r)}: ${r.status === "completed" && r.verified ? `verified, downtime ${r.downtimeMs?.toFixed(1)} ms, total ${(r.totalTimeMs / 1e3).toFixed(2)} s` : `FAILED: ${r.error}`} (wall ${(r.wallTimeMs / 1e3).toFixed(1)} s)`),
    });
    if (interrupt.signal.aborted) {
      io.err.write(`compare interrupted by ${String(interrupt.signal.reason)} after ${ran.results.length} of ${cells.length} cells (each interrupted migration cleaned up)\n`);
      return SIGNAL_EXIT[String(interrupt.signal.reason)] ?? EXIT.interrupted;
    }
    const ranked = rank(ran.results, by);
    const table = compareTable(ranked, by);
    io.out.write(`${table}\n`);
    const simulated = ran.results.reduce((n, r) => n + r.totalTimeMs, 0) / 1e3;
    say(`${cells.length} cells in ${(ran.wallTimeMs / 1e3).toFixed(1)} s of wall time (${(simulated / (ran.wallTimeMs / 1e3)).toFixed(1)} simulated s per wall s)`);
    const meta = { guest: { memory: guest.memoryBytes, vcpus: guest.vcpus, backing: guest.backing, workload: v.workload ?? "hot-cold", seed: guest.seed }, "rank-by": by };
    if (v.json) await writeFile(v.json, JSON.stringify(compareJson(ranked, meta), null, 2) + "\n");
    if (v.report) {
      await writeFile(v.report, compareHtml(ranked, { title: `Comparison of ${cells.length} cells`, guest: guestText, by }));
    }
    const files = [v.json && `JSON: ${v.json}`, v.report && `HTML: ${v.report}`].filter(Boolean);
    if (files.length) say(`written: ${files.join(", ")}`);
    return ranked.every((r) => r.status === "completed" && r.verified) ? EXIT.ok : EXIT.failed;
  } finally {
    interrupt.dispose();
  }
}
