/**
 * The command line's shared parts: the flags and how they parse (the
 * migration policy, the guest's description, security, output files), the
 * exit codes, and the signals that interrupt a run.
 */
import { status } from "@grpc/grpc-js";
import { accessSync, constants as fsConstants, existsSync, readFileSync, statSync } from "node:fs";
import { dirname, resolve } from "node:path";
import type { Io } from "../../common/io.js";
import { parseBytes } from "../../common/config.js";
import type { ClientOptions } from "../../common/client.js";
import { securityFromEnv } from "../../common/security.js";
import { DEFAULT_CONFIG, MigrationError, type FailureKind, type MigrationConfig } from "./migrate.js";
import { archOf, MechanismError, parseMechanism, type MechanismSpec } from "./trackers/index.js";
import { BACKINGS, type GuestSpec } from "./demo-vm.js";
import { formatDuration, parseBandwidth, parseDuration } from "./units.js";
import { buildWorkload, WORKLOADS, type WorkloadName, type WorkloadParams } from "./workloads.js";
import type { TraceFile } from "./trace/format.js";
import { readTrace, TraceFileError, traceWorkloads } from "./trace/replay.js";
import { QEMU_AUTO_CONVERGE, type AutoConvergeConfig } from "./policies/auto-converge.js";
import { QEMU_DIRTY_LIMIT, type DirtyLimitConfig } from "./policies/dirty-limit.js";
import { applyMigrationPolicy, parseMigrationPolicy, PolicyFileError } from "./policies/kubevirt-policy.js";
import type { PostcopyConfig } from "./types.js";
import type { Values } from "./options.js";

export const EXIT: Record<FailureKind | "ok", number> = {
  ok: 0,
  failed: 1,
  usage: 2,
  unreachable: 3,
  "not-found": 3,
  precondition: 3,
  "not-converged": 4,
  verification: 5,
  // A failure after the post-copy switch: neither side holds the whole guest any more.
  "postcopy-lost": 6,
  // 128 + the signal's number: 130 for SIGINT; a SIGTERM makes it 143 (see exitFor).
  interrupted: 130,
};

export const SIGNAL_EXIT: Record<string, number> = { SIGINT: 130, SIGTERM: 143 };

export function exitFor(err: MigrationError, signal: AbortSignal): number {
  return err.kind === "interrupted" ? (SIGNAL_EXIT[String(signal.reason)] ?? EXIT.interrupted) : EXIT[err.kind];
}

export class UsageError extends Error {}

const RPC_EXIT: Partial<Record<number, number>> = {
  [status.UNAVAILABLE]: EXIT.unreachable,
  [status.DEADLINE_EXCEEDED]: EXIT.unreachable,
  [status.NOT_FOUND]: EXIT["not-found"],
  [status.FAILED_PRECONDITION]: EXIT.precondition,
  [status.INVALID_ARGUMENT]: EXIT.usage,
};

/** The exit code of a hypervisor call that failed with a gRPC status; null when err is not such a failure. */
export function exitForRpcError(err: unknown): number | null {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === "number" ? (RPC_EXIT[code] ?? EXIT.failed) : null;
}

export type { Values } from "./options.js";

export function number(v: string | undefined, name: string, fallback: number, check: (n: number) => boolean, what: string): number {
  if (v === undefined) return fallback;
  const n = Number(v);
  if (!Number.isFinite(n) || !check(n)) throw new UsageError(`--${name} ${v}: must be ${what}`);
  return n;
}

/** The flags that take a duration. */
type DurationFlag = "latency" | "downtime-limit" | "progress-timeout" | "completion-timeout-per-gib" | "rpc-timeout" | "vcpu-dirty-limit-period" | "pause-ms" | "calc-time" | "checkpoint-every" | "checkpoint-for" | "stream-for" | "interval";

/**
 * A duration flag in ms: units ms, s, m or h, a bare number in `bare` (the unit its help names),
 * within [min, max] (above min when `aboveMin`), whole ms when `whole`; the same message for every one.
 */
export function duration(v: Values, name: DurationFlag, o: { fallbackMs: number; bare: "ms" | "s"; min: number; max?: number; aboveMin?: boolean; whole?: boolean }): number {
  const text = v[name];
  if (text === undefined) return o.fallbackMs;
  let ms = NaN;
  try {
    ms = parseDuration(text, o.bare);
  } catch {
    // Said below, with the range.
  }
  const max = o.max ?? Infinity;
  if (Number.isFinite(ms) && (o.aboveMin ? ms > o.min : ms >= o.min) && ms <= max && (!o.whole || Number.isInteger(ms))) return ms;
  const range = max === Infinity ? `${o.aboveMin ? ">" : ">="} ${formatDuration(o.min)}` : `from ${formatDuration(o.min)} to ${formatDuration(max)}`;
  const examples = o.bare === "ms" ? "300ms, 1.5s; a bare number is ms" : "1.5s, 500ms, 2m; a bare number is seconds";
  throw new UsageError(`--${name} ${text}: must be ${o.whole ? "a whole number of ms" : "a duration"} ${range} (${examples})`);
}

/** The configuration from the flags, then a KubeVirt MigrationPolicy file's spec over it (--policy). */
export function policy(v: Values): Omit<MigrationConfig, "sourceVm" | "destinationVm"> {
  const cfg = flagPolicy(v);
  if (v.policy === undefined) return cfg;
  let text: string;
  try {
    text = readFileSync(v.policy, "utf8");
  } catch (e) {
    throw new UsageError(`--policy ${v.policy}: cannot read it: ${(e as Error).message}`);
  }
  let p;
  try {
    p = parseMigrationPolicy(text, v.policy);
  } catch (e) {
    if (e instanceof PolicyFileError) throw new UsageError(`--policy ${e.message}`);
    throw e;
  }
  // A setting both the file and a flag give is ambiguous: say which.
  const both: [keyof typeof p, string][] = [
    ["allowAutoConverge", "auto-converge"],
    ["completionTimeoutPerGiB", "completion-timeout-per-gib"],
    ["allowPostCopy", "postcopy"],
    ["allowWorkloadDisruption", "postcopy"],
  ];
  for (const [field, flag] of both) if (p[field] !== undefined && v[flag as keyof Values] !== undefined) throw new UsageError(`--${flag} conflicts with spec.${field} in ${v.policy}: give it in one place`);
  return applyMigrationPolicy(cfg, p);
}

function flagPolicy(v: Values): Omit<MigrationConfig, "sourceVm" | "destinationVm"> {
  let mechanism: string;
  try {
    mechanism = parseMechanism(v.mechanism ?? DEFAULT_CONFIG.mechanism).name;
  } catch (e) {
    if (e instanceof MechanismError) throw new UsageError(`--mechanism ${e.message}`);
    throw e;
  }
  let bandwidth = DEFAULT_CONFIG.bandwidthBitsPerSecond;
  if (v.bandwidth !== undefined) {
    try {
      bandwidth = parseBandwidth(v.bandwidth);
    } catch (e) {
      throw new UsageError(`--bandwidth: ${(e as Error).message}`);
    }
  }
  return {
    mechanism,
    bandwidthBitsPerSecond: bandwidth,
    latencyNs: duration(v, "latency", { fallbackMs: DEFAULT_CONFIG.latencyNs / 1e6, bare: "ms", min: 0 }) * 1e6,
    downtimeLimitMs: duration(v, "downtime-limit", { fallbackMs: DEFAULT_CONFIG.downtimeLimitMs, bare: "ms", min: 0, aboveMin: true }),
    maxRounds: v["max-rounds"] === undefined ? null : number(v["max-rounds"], "max-rounds", 0, (n) => Number.isInteger(n) && n >= 1, "a whole number >= 1"),
    progressTimeoutS: duration(v, "progress-timeout", { fallbackMs: DEFAULT_CONFIG.progressTimeoutS * 1e3, bare: "s", min: 0, aboveMin: true }) / 1e3,
    completionTimeoutPerGiBS: duration(v, "completion-timeout-per-gib", { fallbackMs: DEFAULT_CONFIG.completionTimeoutPerGiBS * 1e3, bare: "s", min: 0, aboveMin: true }) / 1e3,
    completionTimeoutAction: DEFAULT_CONFIG.completionTimeoutAction,
    chunkPages: number(v["chunk-pages"], "chunk-pages", DEFAULT_CONFIG.chunkPages, (n) => Number.isInteger(n) && n >= 64 && n % 64 === 0 && n <= 1 << 20, "a multiple of 64 up to 1048576"),
    rpcTimeoutMs: duration(v, "rpc-timeout", { fallbackMs: DEFAULT_CONFIG.rpcTimeoutMs, bare: "s", min: 100, max: 3_600_000 }),
    autoConverge: autoConverge(v),
    dirtyLimit: dirtyLimit(v),
    postcopy: postcopy(v),
  };
}

export const POSTCOPY_FLAGS = ["postcopy-after-rounds", "postcopy-preempt"] as const;

/** --postcopy and its parameters; a parameter without it is an error. */
function postcopy(v: Values): PostcopyConfig | null {
  const given = POSTCOPY_FLAGS.filter((f) => v[f] !== undefined);
  if (!v.postcopy) {
    if (given.length) throw new UsageError(`--${given[0]} needs --postcopy`);
    return null;
  }
  const after = v["postcopy-after-rounds"];
  return {
    afterRounds: after === undefined ? null : whole(v, "postcopy-after-rounds", 0, 1, Number.MAX_SAFE_INTEGER, "number of syncs"),
    preempt: v["postcopy-preempt"] ?? false,
  };
}

export const AUTO_CONVERGE_FLAGS = ["cpu-throttle-initial", "cpu-throttle-increment", "cpu-throttle-tailslow", "max-cpu-throttle"] as const;
export const DIRTY_LIMIT_FLAGS = ["vcpu-dirty-limit", "vcpu-dirty-limit-period"] as const;

export const whole = (v: Values, name: string, fallback: number, lo: number, hi: number, unit: string) =>
  number(v[name as keyof Values] as string | undefined, name, fallback, (n) => Number.isInteger(n) && n >= lo && n <= hi, `a whole ${unit} in [${lo}, ${hi}]`);

/** QEMU's throttle-trigger-threshold, which auto-converge and dirty-limit share; an error without either. */
function triggerThreshold(v: Values): number {
  if (v["throttle-trigger-threshold"] !== undefined && !v["auto-converge"] && !v["dirty-limit"]) throw new UsageError("--throttle-trigger-threshold needs --auto-converge or --dirty-limit");
  return whole(v, "throttle-trigger-threshold", QEMU_AUTO_CONVERGE.throttleTriggerThreshold, 1, 100, "percentage");
}

/** --dirty-limit and its parameters, QEMU's defaults where not given; a parameter without --dirty-limit is an error. */
function dirtyLimit(v: Values): DirtyLimitConfig | null {
  const given = DIRTY_LIMIT_FLAGS.filter((f) => v[f] !== undefined);
  if (!v["dirty-limit"]) {
    if (given.length) throw new UsageError(`--${given[0]} needs --dirty-limit`);
    return null;
  }
  if (v["auto-converge"]) throw new UsageError("--dirty-limit conflicts with --auto-converge (as QEMU's capabilities do): choose one");
  const q = QEMU_DIRTY_LIMIT;
  return {
    throttleTriggerThreshold: triggerThreshold(v),
    vcpuDirtyLimitMBps: whole(v, "vcpu-dirty-limit", q.vcpuDirtyLimitMBps, 1, Number.MAX_SAFE_INTEGER, "number of MB/s"),
    periodMs: duration(v, "vcpu-dirty-limit-period", { fallbackMs: q.periodMs, bare: "ms", min: 1, max: 1000, whole: true }),
  };
}

/** --auto-converge and its parameters, QEMU's defaults where not given; a parameter without --auto-converge is an error. */
function autoConverge(v: Values): AutoConvergeConfig | null {
  const given = AUTO_CONVERGE_FLAGS.filter((f) => v[f] !== undefined);
  if (!v["auto-converge"]) {
    if (given.length) throw new UsageError(`--${given[0]} needs --auto-converge`);
    triggerThreshold(v);
    return null;
  }
  const pct = (name: (typeof AUTO_CONVERGE_FLAGS)[number], fallback: number, lo: number, hi: number) => whole(v, name, fallback, lo, hi, "percentage");
  const q = QEMU_AUTO_CONVERGE;
  return {
    throttleTriggerThreshold: triggerThreshold(v),
    cpuThrottleInitial: pct("cpu-throttle-initial", q.cpuThrottleInitial, 1, 99),
    cpuThrottleIncrement: pct("cpu-throttle-increment", q.cpuThrottleIncrement, 1, 99),
    cpuThrottleTailslow: v["cpu-throttle-tailslow"] ?? q.cpuThrottleTailslow,
    maxCpuThrottle: pct("max-cpu-throttle", q.maxCpuThrottle, 1, 99),
  };
}

/** How the controller's clients connect: its security settings and its hang bound. */
export function clientOptions(v: Values, io: Io, cfg: { rpcTimeoutMs: number }): ClientOptions {
  let security;
  try {
    security = securityFromEnv(io.env, { ca: v["tls-ca"], cert: v["tls-cert"], key: v["tls-key"], token: v.token });
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
  return { security, deadlineMs: cfg.rpcTimeoutMs, hangTimeoutMs: cfg.rpcTimeoutMs };
}

/** Output files must be writable before a migration starts, not after it ran for an hour. */
export function checkOutputs(v: Values, flags: readonly ("json" | "report" | "out")[] = ["json", "report"]): void {
  for (const [flag, file] of flags.map((f) => [f, v[f]] as const)) {
    if (!file) continue;
    const path = resolve(file);
    const dir = dirname(path);
    const fail = (why: string) => new UsageError(`--${flag} ${file}: ${why}`);
    if (!existsSync(dir)) throw fail(`the directory ${dir} does not exist`);
    if (existsSync(path) && statSync(path).isDirectory()) throw fail("is a directory");
    try {
      accessSync(existsSync(path) ? path : dir, fsConstants.W_OK);
    } catch {
      throw fail(`cannot write ${existsSync(path) ? "it" : `in ${dir}`}`);
    }
  }
}

export function interruptOnSignals(): { signal: AbortSignal; dispose(): void } {
  const ac = new AbortController();
  const on = { SIGINT: () => ac.abort("SIGINT"), SIGTERM: () => ac.abort("SIGTERM") };
  process.on("SIGINT", on.SIGINT);
  process.on("SIGTERM", on.SIGTERM);
  return {
    signal: ac.signal,
    dispose() {
      process.off("SIGINT", on.SIGINT);
      process.off("SIGTERM", on.SIGTERM);
    },
  };
}


const PHASE_FLAGS = { bursty: ["checkpoint-every", "checkpoint-for", "checkpoint-rate", "checkpoint-fraction"], training: ["stream-for", "stream-rate"] } as const;

/** --workload's parameters; a phased workload's flag with another workload is an error. */
function workloadParams(v: Values, workload: WorkloadName): WorkloadParams {
  for (const [name, flags] of Object.entries(PHASE_FLAGS)) {
    const given = flags.find((f) => v[f] !== undefined);
    if (given && workload !== name) throw new UsageError(`--${given} is for --workload ${name}`);
  }
  const rate = number(v["write-rate"], "write-rate", 100_000, (n) => n >= 0 && n <= 1e9, "writes per second in [0, 1e9]");
  const positiveRate = (name: "checkpoint-rate" | "stream-rate", fallback: number) => number(v[name], name, fallback, (n) => n > 0 && n <= 1e9, "writes per second in (0, 1e9]");
  const phaseNs = (name: "checkpoint-every" | "checkpoint-for" | "stream-for", fallbackMs: number) => duration(v, name, { fallbackMs, bare: "s", min: 1, max: 3_600_000 }) * 1e6;
  const checkpoint = {
    everyNs: phaseNs("checkpoint-every", 5000),
    forNs: phaseNs("checkpoint-for", 500),
    writesPerSecond: workload === "bursty" ? positiveRate("checkpoint-rate", Math.max(1, 10 * rate)) : 1,
    fraction: number(v["checkpoint-fraction"], "checkpoint-fraction", 0.25, (n) => n > 0 && n <= 1, "in (0, 1]"),
  };
  if (checkpoint.forNs >= checkpoint.everyNs) throw new UsageError(`--checkpoint-for must be shorter than --checkpoint-every (${checkpoint.forNs / 1e6} ms >= ${checkpoint.everyNs / 1e6} ms)`);
  if ((workload === "bursty" || workload === "training") && !(rate > 0)) throw new UsageError(`--write-rate 0: --workload ${workload} writes in every phase (use --workload idle)`);
  return {
    writesPerSecond: rate,
    hotFraction: number(v["hot-fraction"], "hot-fraction", 0.05, (n) => n > 0 && n <= 1, "in (0, 1]"),
    hotWriteFraction: number(v["hot-write-fraction"], "hot-write-fraction", 0.9, (n) => n > 0 && n <= 1, "in (0, 1]"),
    zipfSkew: number(v["zipf-skew"], "zipf-skew", 0.99, (n) => n > 0 && n <= 10, "in (0, 10]"),
    checkpoint,
    stream: { forNs: phaseNs("stream-for", 2000), writesPerSecond: workload === "training" ? positiveRate("stream-rate", rate) : 1 },
  };
}

/** A trace file, or what is wrong with it, as a usage error (exit 2). */
function traceFile(path: string): TraceFile;
function traceFile<T>(path: string, then: (t: TraceFile) => T): T;
function traceFile<T>(path: string, then?: (t: TraceFile) => T): T | TraceFile {
  try {
    const t = readTrace(path);
    return then ? then(t) : t;
  } catch (e) {
    if (e instanceof TraceFileError) throw new UsageError(`--trace ${e.message}`);
    throw e;
  }
}

export function guestSpec(v: Values, mechanism: MechanismSpec | null): GuestSpec {
  let memory: number;
  try {
    memory = parseBytes(v.memory ?? "4GiB");
  } catch (e) {
    throw new UsageError(`--memory: ${(e as Error).message}`);
  }
  if (memory < 2 ** 20 || memory % 4096 !== 0) throw new UsageError(`--memory ${v.memory}: must be a multiple of 4 KiB and at least 1 MiB`);
  const workload = (v.workload ?? "hot-cold") as WorkloadName;
  if (!(workload in WORKLOADS)) throw new UsageError(`--workload ${v.workload}: must be one of ${Object.keys(WORKLOADS).join(", ")}`);
  if ((workload === "trace") !== (v.trace !== undefined)) throw new UsageError(workload === "trace" ? "--workload trace needs --trace FILE" : "--trace FILE is for --workload trace");
  const trace = v.trace === undefined ? null : traceFile(v.trace);
  if (trace && v["noisy-vcpu-rate"] !== undefined) throw new UsageError("--noisy-vcpu-rate does not apply to --workload trace: the trace gives every vCPU its writes");
  // A trace recorded per vCPU brings its vCPU count.
  const vcpus = number(v.vcpus, "vcpus", trace && !trace.perVm ? trace.vcpus : 4, (n) => Number.isInteger(n) && n >= 1 && n <= 512, "a whole number in [1, 512]");
  const backing = (v.backing ?? "4k") as GuestSpec["backing"];
  if (!(backing in BACKINGS)) throw new UsageError(`--backing ${v.backing}: must be one of ${Object.keys(BACKINGS).join(", ")}`);
  if (memory % { "4k": 4096, "2m": 2 ** 21, "1g": 2 ** 30 }[backing] !== 0) throw new UsageError(`--memory ${v.memory}: must be a multiple of the --backing page size ${backing}`);
  const arch = v.arch ?? (mechanism && archOf(mechanism) === "x86_64" ? "x86_64" : "arm64");
  if (arch !== "arm64" && arch !== "x86_64") throw new UsageError(`--arch ${arch}: must be arm64 or x86_64`);
  if (mechanism && archOf(mechanism) !== "any" && archOf(mechanism) !== arch) throw new UsageError(`--mechanism ${mechanism.name} needs --arch ${archOf(mechanism)}`);
  return {
    memoryBytes: memory,
    vcpus,
    arch,
    backing,
    workload: buildWorkload(workload, workloadParams(v, workload), memory / 4096),
    vcpuWorkloads: trace ? traceFile(v.trace!, (t) => traceWorkloads(t, v.trace!, vcpus, memory / 4096)) : null,
    noisyWritesPerSecond: v["noisy-vcpu-rate"] === undefined ? null : number(v["noisy-vcpu-rate"], "noisy-vcpu-rate", 0, (n) => n >= 0 && n <= 1e9, "writes per second in [0, 1e9]"),
    seed: number(v.seed, "seed", 1, (n) => Number.isInteger(n) && n >= 0, "a whole number >= 0"),
    ringEntries: number(v["ring-entries"], "ring-entries", 4096, (n) => Number.isInteger(n) && n >= 256 && n <= 65536 && (n & (n - 1)) === 0, "a power of two in [256, 65536]"),
  };
}
