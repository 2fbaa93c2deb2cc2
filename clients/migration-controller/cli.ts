/**
 * The migration controller's command line: `migrate` a VM between two
 * hypervisors, or run the embedded `demo` (two hypervisors on 127.0.0.1, a
 * demo VM, a verified migration, a report). Returns an exit code; never
 * prints a stack trace for a user's mistake or a failed migration.
 */
import { accessSync, constants as fsConstants, existsSync, readFileSync, statSync } from "node:fs";
import { writeFile } from "node:fs/promises";
import { status } from "@grpc/grpc-js";
import { dirname, resolve } from "node:path";
import { parseArgs } from "node:util";
import type { Io } from "../../common/io.js";
import { runCalibrate } from "../calibrate/calibrate.js";
import { ConfigError, envHost, envPort, parseBytes } from "../../common/config.js";
import type { ClientOptions } from "../../common/client.js";
import { securityFromEnv } from "../../common/security.js";
import { spawnService, type SpawnedService } from "../../common/spawn.js";
import { Arch, Capability, DirtyRateMode, DirtyRateStatus, WorkloadPattern, type DirtyRateInfo } from "../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { connectHypervisor, type HypervisorClient } from "../../services/hypervisor/client.js";
import { DEFAULT_CONFIG, explain, migrate, MigrationError, type CleanupReport, type FailureKind, type MigrationConfig, type MigrationReport } from "./migrate.js";
import { createLogger } from "../../common/log.js";
import { progressPrinter } from "./progress.js";
import { MigrationService } from "./service.js";
import { htmlReport, jsonReport, textReport } from "./report.js";
import { ALIASES, archOf, MechanismError, parseMechanism, PARTS } from "./trackers/index.js";
import { guestMemslots, ipaBitsFor } from "./guest.js";
import { parseBandwidth } from "./units.js";
import { QEMU_AUTO_CONVERGE, type AutoConvergeConfig } from "./policies/auto-converge.js";
import { QEMU_DIRTY_LIMIT, type DirtyLimitConfig } from "./policies/dirty-limit.js";
import { applyMigrationPolicy, parseMigrationPolicy, PolicyFileError } from "./policies/kubevirt-policy.js";
import type { PostcopyConfig } from "./types.js";

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

const SIGNAL_EXIT: Record<string, number> = { SIGINT: 130, SIGTERM: 143 };

function exitFor(err: MigrationError, signal: AbortSignal): number {
  return err.kind === "interrupted" ? (SIGNAL_EXIT[String(signal.reason)] ?? EXIT.interrupted) : EXIT[err.kind];
}

const HELP = `usage:
  migration-controller demo [options]                       run the embedded default: two hypervisors on
                                                            127.0.0.1, a demo VM, a verified migration, a report
  migration-controller migrate --vm NAME [options]          migrate a VM between running hypervisors
  migration-controller serve [options]                      keep a demo VM migrating back and forth between two
                                                            hypervisors (real-time clock), metrics on /metrics
  migration-controller estimate --vm NAME [options]         measure a running VM's dirty rate (QEMU's calc-dirty-rate)
  migration-controller calibrate [options]                  measure this host's KVM (/dev/kvm) and write a cost model
                                                            that HYPERVISOR_COST_MODEL loads (calibrate --help)

serve options:
  --hypervisor-a ADDR, --hypervisor-b ADDR   the two hypervisors (env MIGRATION_HYPERVISOR_A / _B)
  --http-port N              ops port for /metrics and /healthz (env MIGRATION_HTTP_PORT; default 9480)
  --host ADDR                ops bind address (env MIGRATION_HOST; default 127.0.0.1)
  --realtime-speed F         guest seconds per wall second (default 1)
  --pause-ms N               wall time between migrations (default 2000)
  (--vm, --memory, --vcpus, --write-rate, --hot-fraction as for demo; defaults demo, 1GiB, 2, 20000, 0.05)

estimate options:
  --source ADDR              the VM's hypervisor (env MIGRATION_SOURCE; default 127.0.0.1:50051)
  --vm NAME                  the VM (required)
  --mode MODE                page-sampling | dirty-bitmap | dirty-ring (default page-sampling, as QEMU)
  --calc-time T              how long to measure: 1s, 500ms; a bare number is seconds (default 1s; 50ms to 60s)
  --sample-pages N           page-sampling: pages per GiB, 128 to 16384 (default 512)
  --json FILE                write query-dirty-rate's answer as JSON (QEMU's names)

migrate options:
  --source ADDR              source hypervisor (env MIGRATION_SOURCE; default 127.0.0.1:50051)
  --destination ADDR         destination hypervisor (env MIGRATION_DESTINATION; default: the source)
  --vm NAME                  the VM to migrate (required)
  --dest-vm NAME             name of the VM created on the destination (default NAME-migrated)

demo options:
  --memory SIZE              guest memory (default 4GiB)
  --vcpus N                  vCPUs (default 4)
  --workload PATTERN         hot-cold | uniform | sequential | zipf | idle (default hot-cold)
  --write-rate N             guest writes per second per vCPU (default 100000)
  --hot-fraction F           hot share of memory (default 0.05)
  --hot-write-fraction F     share of writes to hot pages (default 0.9)
  --zipf-skew S              zipf: page of rank k written with probability ~ 1/k^S, in (0, 10] (default 0.99, YCSB's)
  --noisy-vcpu-rate N        vCPU 0 writes N per second instead (one noisy vCPU: per-vCPU dirty rates
                             and QEMU's dirty limit tell it from the others; default: as the others)
  --seed N                   workload seed (default 1)
  --ring-entries N           dirty-ring entries per vCPU with --mechanism ring (default 4096, QEMU's advice)
  --arch A                   arm64 | x86_64 (default arm64; x86_64 when the mechanism uses pml)

policy and link (both commands):
  --mechanism M              LOG[+PROTECTION][+ASSIST] (default bitmap):
${Object.entries(PARTS).map(([k, d]) => `                               ${k.padEnd(14)} ${d}`).join("\n")}
                             aliases: ${Object.entries(ALIASES).map(([a, m]) => `${a} = ${m}`).join(", ")}
  --bandwidth RATE           link bandwidth, e.g. 10Gbit, 800Mbit, 1.25GB/s (default 10Gbit)
  --latency MS               link latency in ms (default 0.1)
  --downtime-limit MS        switch over when the dirty bytes fit in bandwidth x this (default 300, as QEMU)
  --max-rounds N             force the switchover after N syncs (Xen-style cap; default none, as QEMU)
  --progress-timeout S       fail when the remaining bytes have not fallen for S guest seconds (default 150)
  --completion-timeout-per-gib S   fail past S guest seconds per GiB of memory (default 150)
  --chunk-pages N            pages per copy chunk, a multiple of 64 (default 262144 = 1 GiB)
  --rpc-timeout S            wall seconds to wait for a hypervisor that stopped answering before the
                             migration fails cleanly (the deadline of ordinary calls; default 10)
  --auto-converge            throttle the source's vCPUs when they dirty faster than the link carries,
                             as QEMU's auto-converge (off by default, as in QEMU); with:
    --cpu-throttle-initial PCT         the first throttle (20)
    --cpu-throttle-increment PCT       added at each later trigger (10)
    --cpu-throttle-tailslow            smaller steps near the ideal throttle
    --max-cpu-throttle PCT             the cap (99)
  --dirty-limit              limit each source vCPU's dirty page rate when they dirty faster than the link
                             carries, as QEMU's dirty-limit (needs --mechanism ring; excludes --auto-converge); with:
    --vcpu-dirty-limit MBPS            the limit per vCPU in MB/s (1, QEMU's vcpu-dirty-limit)
    --vcpu-dirty-limit-period MS       how often each vCPU's rate is measured, 1-1000 (1000, x-vcpu-dirty-limit-period)
  --throttle-trigger-threshold PCT     with either: dirtied vs transferred bytes in a period that counts as high (50)
  --postcopy                 allow post-copy (QEMU's postcopy-ram): when pre-copy stops making progress (a sync
                             finds no fewer bytes dirty than the one before) the guest moves to the destination
                             and its remaining pages follow; a failure after that switch loses the VM (exit 6); with:
    --postcopy-after-rounds N          switch after N syncs instead
    --postcopy-preempt                 page requests on a channel of their own (QEMU's postcopy-preempt)
  --policy FILE              a KubeVirt MigrationPolicy (migrations.kubevirt.io/v1alpha1) applied as KubeVirt does:
                             allowAutoConverge, bandwidthPerMigration (caps --bandwidth), completionTimeoutPerGiB,
                             allowPostCopy / allowWorkloadDisruption (at the completion timeout switch to post-copy,
                             or pause the guest to complete, instead of aborting); other fields are errors

security (both commands; flags win over TLS_CERT_FILE, TLS_KEY_FILE, TLS_CA_FILE, AUTH_TOKEN):
  --tls-ca FILE              use TLS and verify the hypervisors against this CA
  --tls-cert FILE, --tls-key FILE   client certificate and key for mutual TLS
  --token TOKEN              bearer token the hypervisors require

output:
  --json FILE                write the report as JSON (QEMU query-migrate names, units in "units")
  --report FILE              write a self-contained HTML report with charts
  --quiet                    no progress lines
  -h, --help                 this text

exit codes: 0 migrated and verified; 1 other failure; 2 bad usage; 3 unreachable hypervisor, unknown VM
or a precondition (destination exists, slot already logging, over a hypervisor's memory budget);
4 did not converge (timeout); 5 verification failed (destination differs from source);
6 the VM was lost: a failure after the switch to post-copy (the source stays paused, the destination is kept, waiting on the missing pages);
130 / 143 interrupted by SIGINT / SIGTERM (the source is resumed, logging off, the destination removed).`;

export type { Io };

class UsageError extends Error {}

const OPTIONS = {
  source: { type: "string" },
  destination: { type: "string" },
  vm: { type: "string" },
  "dest-vm": { type: "string" },
  memory: { type: "string" },
  vcpus: { type: "string" },
  workload: { type: "string" },
  "write-rate": { type: "string" },
  "hot-fraction": { type: "string" },
  "zipf-skew": { type: "string" },
  mode: { type: "string" },
  "calc-time": { type: "string" },
  "sample-pages": { type: "string" },
  "hot-write-fraction": { type: "string" },
  "noisy-vcpu-rate": { type: "string" },
  seed: { type: "string" },
  "ring-entries": { type: "string" },
  arch: { type: "string" },
  "hypervisor-a": { type: "string" },
  "hypervisor-b": { type: "string" },
  "http-port": { type: "string" },
  host: { type: "string" },
  "realtime-speed": { type: "string" },
  "pause-ms": { type: "string" },
  mechanism: { type: "string" },
  bandwidth: { type: "string" },
  latency: { type: "string" },
  "downtime-limit": { type: "string" },
  "max-rounds": { type: "string" },
  "progress-timeout": { type: "string" },
  "completion-timeout-per-gib": { type: "string" },
  "chunk-pages": { type: "string" },
  "rpc-timeout": { type: "string" },
  "auto-converge": { type: "boolean" },
  "throttle-trigger-threshold": { type: "string" },
  "cpu-throttle-initial": { type: "string" },
  "cpu-throttle-increment": { type: "string" },
  "cpu-throttle-tailslow": { type: "boolean" },
  "max-cpu-throttle": { type: "string" },
  "dirty-limit": { type: "boolean" },
  "vcpu-dirty-limit": { type: "string" },
  "vcpu-dirty-limit-period": { type: "string" },
  postcopy: { type: "boolean" },
  "postcopy-after-rounds": { type: "string" },
  "postcopy-preempt": { type: "boolean" },
  policy: { type: "string" },
  "tls-ca": { type: "string" },
  "tls-cert": { type: "string" },
  "tls-key": { type: "string" },
  token: { type: "string" },
  json: { type: "string" },
  report: { type: "string" },
  quiet: { type: "boolean" },
  help: { type: "boolean", short: "h" },
} as const;

type Values = ReturnType<typeof parseArgs<{ options: typeof OPTIONS; allowPositionals: true }>>["values"];

function number(v: string | undefined, name: string, fallback: number, check: (n: number) => boolean, what: string): number {
  if (v === undefined) return fallback;
  const n = Number(v);
  if (!Number.isFinite(n) || !check(n)) throw new UsageError(`--${name} ${v}: must be ${what}`);
  return n;
}

/** The configuration from the flags, then a KubeVirt MigrationPolicy file's spec over it (--policy). */
function policy(v: Values): Omit<MigrationConfig, "sourceVm" | "destinationVm"> {
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
  const pos = (n: number) => n > 0;
  return {
    mechanism,
    bandwidthBitsPerSecond: bandwidth,
    latencyNs: number(v.latency, "latency", DEFAULT_CONFIG.latencyNs / 1e6, (n) => n >= 0, "a number of ms >= 0") * 1e6,
    downtimeLimitMs: number(v["downtime-limit"], "downtime-limit", DEFAULT_CONFIG.downtimeLimitMs, pos, "a number of ms > 0"),
    maxRounds: v["max-rounds"] === undefined ? null : number(v["max-rounds"], "max-rounds", 0, (n) => Number.isInteger(n) && n >= 1, "a whole number >= 1"),
    progressTimeoutS: number(v["progress-timeout"], "progress-timeout", DEFAULT_CONFIG.progressTimeoutS, pos, "a number of seconds > 0"),
    completionTimeoutPerGiBS: number(v["completion-timeout-per-gib"], "completion-timeout-per-gib", DEFAULT_CONFIG.completionTimeoutPerGiBS, pos, "a number of seconds > 0"),
    completionTimeoutAction: DEFAULT_CONFIG.completionTimeoutAction,
    chunkPages: number(v["chunk-pages"], "chunk-pages", DEFAULT_CONFIG.chunkPages, (n) => Number.isInteger(n) && n >= 64 && n % 64 === 0 && n <= 1 << 20, "a multiple of 64 up to 1048576"),
    rpcTimeoutMs: number(v["rpc-timeout"], "rpc-timeout", DEFAULT_CONFIG.rpcTimeoutMs / 1e3, (n) => n >= 0.1 && n <= 3600, "a number of seconds in [0.1, 3600]") * 1e3,
    autoConverge: autoConverge(v),
    dirtyLimit: dirtyLimit(v),
    postcopy: postcopy(v),
  };
}

/** --postcopy and its parameters; a parameter without it is an error. */
function postcopy(v: Values): PostcopyConfig | null {
  const given = (["postcopy-after-rounds", "postcopy-preempt"] as const).filter((f) => v[f] !== undefined);
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

const AUTO_CONVERGE_FLAGS = ["cpu-throttle-initial", "cpu-throttle-increment", "cpu-throttle-tailslow", "max-cpu-throttle"] as const;
const DIRTY_LIMIT_FLAGS = ["vcpu-dirty-limit", "vcpu-dirty-limit-period"] as const;

const whole = (v: Values, name: string, fallback: number, lo: number, hi: number, unit: string) =>
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
    periodMs: whole(v, "vcpu-dirty-limit-period", q.periodMs, 1, 1000, "number of ms"),
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
function clientOptions(v: Values, io: Io, cfg: { rpcTimeoutMs: number }): ClientOptions {
  let security;
  try {
    security = securityFromEnv(io.env, { ca: v["tls-ca"], cert: v["tls-cert"], key: v["tls-key"], token: v.token });
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
  return { security, deadlineMs: cfg.rpcTimeoutMs, hangTimeoutMs: cfg.rpcTimeoutMs };
}

/** Output files must be writable before a migration starts, not after it ran for an hour. */
function checkOutputs(v: Values): void {
  for (const [flag, file] of [["json", v.json], ["report", v.report]] as const) {
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

/** What the controller saw of the source and destination after a failure, in one line. */
export function describeCleanup(c: CleanupReport | null, vms: { source: string; destination: string }): string {
  if (!c) return "";
  const src =
    c.sourceRunning === null
      ? `the state of the source VM '${vms.source}' could not be checked`
      : `the source VM '${vms.source}' is ${c.sourceRunning ? "running" : "PAUSED"}${c.sourceThrottled ? ", STILL THROTTLED," : ""} and ${c.sourceLogging ? "STILL LOGGING" : "no longer logging"}`;
  const dst =
    c.destinationRemoved === null
      ? "the destination VM could not be checked"
      : c.destinationRemoved
        ? "the destination VM was removed"
        : `the destination VM '${vms.destination}' is STILL THERE`;
  return `${src}; ${dst}${c.problems.length ? ` (${c.problems.join("; ")})` : ""}`;
}

/**
 * SIGINT and SIGTERM abort the migration (which then cleans up) instead of
 * killing the process; the returned signal says which one came.
 */
function interruptOnSignals(): { signal: AbortSignal; dispose(): void } {
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

const PATTERNS: Record<string, WorkloadPattern> = {
  "hot-cold": WorkloadPattern.WORKLOAD_PATTERN_HOT_COLD,
  uniform: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM,
  sequential: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL,
  zipf: WorkloadPattern.WORKLOAD_PATTERN_ZIPF,
  idle: WorkloadPattern.WORKLOAD_PATTERN_IDLE,
};

async function writeOutputs(v: Values, report: MigrationReport, io: Io) {
  if (v.json) await writeFile(v.json, JSON.stringify(jsonReport(report), null, 2) + "\n");
  if (v.report) await writeFile(v.report, htmlReport(report));
  const files = [v.json && `JSON: ${v.json}`, v.report && `HTML: ${v.report}`].filter(Boolean);
  if (files.length) io.err.write(`report written (${files.join(", ")})\n`);
}

/** Runs one migration with progress and reports; returns the exit code. */
async function runMigration(
  v: Values,
  io: Io,
  cfg: Omit<MigrationConfig, "sourceVm" | "destinationVm">,
  vms: { source: string; destination: string },
  clients: { source: HypervisorClient; destination: HypervisorClient },
  signal: AbortSignal,
): Promise<number> {
  const printer = progressPrinter(io.err, Boolean(v.quiet));
  try {
    const report = await migrate({ ...cfg, sourceVm: vms.source, destinationVm: vms.destination }, { ...clients, onProgress: printer.onProgress, signal });
    printer.end();
    io.out.write(textReport(report) + "\n");
    await writeOutputs(v, report, io);
    // Migrated, but the source could not be told to stop logging: say so.
    for (const p of report.cleanup?.problems ?? []) io.err.write(`warning: the VM runs on the destination, but ${p}\n`);
    return EXIT.ok;
  } catch (err) {
    printer.end();
    if (!(err instanceof MigrationError)) throw err;
    if (err.report) {
      io.out.write(textReport(err.report) + "\n");
      await writeOutputs(v, err.report, io);
    }
    const observed = describeCleanup(err.report?.cleanup ?? null, vms);
    io.err.write(err.kind === "interrupted" ? `migration ${err.message}: ${observed || "nothing had changed yet"}\n` : `migration failed: ${err.message}\n`);
    if (err.kind !== "interrupted" && observed) io.err.write(`${observed}\n`);
    return exitFor(err, signal);
  }
}

const DIRTY_RATE_MODES: Record<string, DirtyRateMode> = {
  "page-sampling": DirtyRateMode.DIRTY_RATE_MODE_PAGE_SAMPLING,
  "dirty-bitmap": DirtyRateMode.DIRTY_RATE_MODE_DIRTY_BITMAP,
  "dirty-ring": DirtyRateMode.DIRTY_RATE_MODE_DIRTY_RING,
};

/** "1s", "500ms", or a bare number of seconds (QEMU's calc-time unit), to ms. */
function calcTimeMs(text: string | undefined): number {
  if (text === undefined) return 1000;
  const m = /^(\d+(?:\.\d+)?)\s*(ms|s)?$/.exec(text.trim());
  const ms = m ? Number(m[1]) * (m[2] === "ms" ? 1 : 1000) : NaN;
  if (!(ms >= 50 && ms <= 60_000) || !Number.isInteger(ms)) throw new UsageError(`--calc-time ${text}: must be a whole number of ms from 50ms to 60s (1s, 500ms, or seconds)`);
  return ms;
}

/** QEMU's calc-dirty-rate then query-dirty-rate, on one VM. */
async function runEstimate(v: Values, io: Io): Promise<number> {
  if (!v.vm) throw new UsageError("--vm NAME is required (the VM to measure)");
  const mode = DIRTY_RATE_MODES[v.mode ?? "page-sampling"];
  if (mode === undefined) throw new UsageError(`--mode ${v.mode}: must be one of ${Object.keys(DIRTY_RATE_MODES).join(", ")}`);
  const ms = calcTimeMs(v["calc-time"]);
  const samplePages = number(v["sample-pages"], "sample-pages", 512, (n) => Number.isInteger(n) && n >= 128 && n <= 16384, "a whole number in [128, 16384]");
  checkOutputs(v);
  // The call lasts the measurement (a stepped VM simulates it, a real-time one waits it out): ten times it, and the usual timeout on top.
  const rpcTimeoutMs = DEFAULT_CONFIG.rpcTimeoutMs + 10 * ms;
  const source = connectHypervisor(v.source ?? io.env.MIGRATION_SOURCE ?? "127.0.0.1:50051", clientOptions(v, io, { rpcTimeoutMs }));
  try {
    io.err.write(`measuring the dirty rate of '${v.vm}' for ${ms} ms (${v.mode ?? "page-sampling"})\n`);
    const info = (await source.calcDirtyRate({ vm: v.vm, calcTimeMs: ms, samplePages, mode })).info!;
    const json = dirtyRateJson(info);
    io.out.write(describeDirtyRate(json, info) + "\n");
    if (v.json) await writeFile(v.json, JSON.stringify(json, null, 2) + "\n");
    return EXIT.ok;
  } catch (err) {
    const e = err as { code?: number; details?: string };
    if (typeof e.code === "number") {
      io.err.write(`estimate: ${e.details ?? String(err)}\n`);
      const exit: Partial<Record<number, number>> = {
        [status.UNAVAILABLE]: EXIT.unreachable,
        [status.DEADLINE_EXCEEDED]: EXIT.unreachable,
        [status.NOT_FOUND]: EXIT["not-found"],
        [status.FAILED_PRECONDITION]: EXIT.precondition,
        [status.INVALID_ARGUMENT]: EXIT.usage,
      };
      return exit[e.code] ?? EXIT.failed;
    }
    throw err;
  } finally {
    source.close();
  }
}

/** query-dirty-rate's answer with QEMU's names and types (integers where QEMU has them), and what measuring cost the guest. */
function dirtyRateJson(i: DirtyRateInfo): Record<string, unknown> {
  const mode = Object.entries(DIRTY_RATE_MODES).find(([, m]) => m === i.mode)?.[0] ?? "page-sampling";
  return {
    status: i.status === DirtyRateStatus.DIRTY_RATE_STATUS_MEASURED ? "measured" : i.status === DirtyRateStatus.DIRTY_RATE_STATUS_MEASURING ? "measuring" : "unstarted",
    "dirty-rate": Number(i.dirtyRate),
    "start-time": Math.floor(Number(i.startTimeNs) / 1e9),
    "calc-time": i.calcTimeMs,
    "calc-time-unit": "millisecond",
    "sample-pages": i.samplePages,
    mode,
    ...(i.vcpuDirtyRate.length ? { "vcpu-dirty-rate": i.vcpuDirtyRate.map((r) => ({ id: r.id, "dirty-rate": Number(r.dirtyRate) })) } : {}),
    "dirty-pages": Number(i.dirtyPages),
    "guest-writes-per-second-before": Math.round(i.guestWritesPerSecondBefore),
    "guest-writes-per-second-during": Math.round(i.guestWritesPerSecondDuring),
    units: { "dirty-rate": "MiB/s", "start-time": "s of guest time", "calc-time": "ms", "dirty-pages": "pages (page-sampling: dirty samples)" },
  };
}

function describeDirtyRate(j: Record<string, unknown>, i: DirtyRateInfo): string {
  const lines = [`Dirty rate: ${j["dirty-rate"]} (MB/s), ${j.mode}, calc time ${i.calcTimeMs} ms${i.samplePages ? `, ${i.samplePages} sample pages per GiB` : ""}`];
  if (i.vcpuDirtyRate.length) lines.push(`vCPU dirty rates (MB/s): ${i.vcpuDirtyRate.map((r) => `${r.id}: ${r.dirtyRate}`).join(", ")}`);
  const before = i.guestWritesPerSecondBefore;
  const during = i.guestWritesPerSecondDuring;
  const cost = before > 0 ? ` (${(100 * (1 - during / before)).toFixed(1)}% slower while measuring)` : "";
  lines.push(`guest writes/s: ${Math.round(before).toLocaleString("en-US")} before, ${Math.round(during).toLocaleString("en-US")} during${cost}`);
  return lines.join("\n");
}

async function runMigrate(v: Values, io: Io): Promise<number> {
  if (!v.vm) throw new UsageError("--vm NAME is required (the VM to migrate)");
  const cfg = policy(v);
  checkOutputs(v);
  const opts = clientOptions(v, io, cfg);
  const source = connectHypervisor(v.source ?? io.env.MIGRATION_SOURCE ?? "127.0.0.1:50051", opts);
  const destination = connectHypervisor(v.destination ?? io.env.MIGRATION_DESTINATION ?? source.address, opts);
  const interrupt = interruptOnSignals();
  try {
    return await runMigration(v, io, cfg, { source: v.vm, destination: v["dest-vm"] ?? `${v.vm}-migrated` }, { source, destination }, interrupt.signal);
  } finally {
    interrupt.dispose();
    source.close();
    destination.close();
  }
}

async function runDemo(v: Values, io: Io): Promise<number> {
  const cfg = policy(v);
  let memory: number;
  try {
    memory = parseBytes(v.memory ?? "4GiB");
  } catch (e) {
    throw new UsageError(`--memory: ${(e as Error).message}`);
  }
  if (memory < 2 ** 20 || memory % 4096 !== 0) throw new UsageError(`--memory ${v.memory}: must be a multiple of 4 KiB and at least 1 MiB`);
  const vcpus = number(v.vcpus, "vcpus", 4, (n) => Number.isInteger(n) && n >= 1 && n <= 512, "a whole number in [1, 512]");
  const pattern = PATTERNS[v.workload ?? "hot-cold"];
  if (pattern === undefined) throw new UsageError(`--workload ${v.workload}: must be one of ${Object.keys(PATTERNS).join(", ")}`);
  const rate = number(v["write-rate"], "write-rate", 100_000, (n) => n >= 0 && n <= 1e9, "writes per second in [0, 1e9]");
  const hot = number(v["hot-fraction"], "hot-fraction", 0.05, (n) => n > 0 && n <= 1, "in (0, 1]");
  const hotWrites = number(v["hot-write-fraction"], "hot-write-fraction", 0.9, (n) => n > 0 && n <= 1, "in (0, 1]");
  const zipfSkew = number(v["zipf-skew"], "zipf-skew", 0.99, (n) => n > 0 && n <= 10, "in (0, 10]");
  const noisy = v["noisy-vcpu-rate"] === undefined ? null : number(v["noisy-vcpu-rate"], "noisy-vcpu-rate", 0, (n) => n >= 0 && n <= 1e9, "writes per second in [0, 1e9]");
  const seed = number(v.seed, "seed", 1, (n) => Number.isInteger(n) && n >= 0, "a whole number >= 0");
  const ringEntries = number(v["ring-entries"], "ring-entries", 4096, (n) => Number.isInteger(n) && n >= 256 && n <= 65536 && (n & (n - 1)) === 0, "a power of two in [256, 65536]");

  checkOutputs(v);
  const opts = clientOptions(v, io, cfg);
  const mechanism = parseMechanism(cfg.mechanism);
  const arch = v.arch ?? (archOf(mechanism) === "x86_64" ? "x86_64" : "arm64");
  if (arch !== "arm64" && arch !== "x86_64") throw new UsageError(`--arch ${arch}: must be arm64 or x86_64`);
  if (archOf(mechanism) !== "any" && archOf(mechanism) !== arch) throw new UsageError(`--mechanism ${mechanism.name} needs --arch ${archOf(mechanism)}`);
  const say = (s: string) => v.quiet || io.err.write(`${s}\n`);
  const services: SpawnedService[] = [];
  const interrupt = interruptOnSignals();
  try {
    say("starting two hypervisors on 127.0.0.1 (source and destination)");
    const env = { HYPERVISOR_GRPC_PORT: "0", HYPERVISOR_HTTP_PORT: "0", HYPERVISOR_ANNOUNCE: "1", HYPERVISOR_HOST: "127.0.0.1" };
    const [src, dst] = await Promise.all([spawnService("services/hypervisor/main.ts", env), spawnService("services/hypervisor/main.ts", env)]);
    services.push(src, dst);
    const source = connectHypervisor(src.address, opts);
    const destination = connectHypervisor(dst.address, opts);
    const setUp = <T>(fn: () => Promise<T>) =>
      fn().catch((err: unknown) => {
        throw explain(err, "source", src.address);
      });
    try {
      if (mechanism.assist === "device") {
        say("starting a page-tracking device beside the source hypervisor");
        services.push(
          await spawnService("services/page-tracking-device/main.ts", {
            PTDEVICE_GRPC_PORT: "0",
            PTDEVICE_HTTP_PORT: "0",
            PTDEVICE_ANNOUNCE: "1",
            PTDEVICE_HYPERVISOR: src.address,
          }),
        );
      }
      say(`source ${src.address}, destination ${dst.address}; creating VM 'demo' (${memory / 2 ** 30} GiB, ${vcpus} vCPUs, ${arch})`);
      await setUp(() =>
        source.createVm({
          vm: "demo",
          vcpus,
          seed: BigInt(seed),
          arch: arch === "x86_64" ? Arch.ARCH_X86_64 : Arch.ARCH_ARM64,
          pml: mechanism.assist === "pml",
          ipaBits: ipaBitsFor(memory),
          memslots: guestMemslots(memory),
          // Rings exist only if the VM is created with them (KVM enables them before vCPUs).
          dirtyRing: mechanism.log === "ring" ? { capability: Capability.CAPABILITY_DIRTY_LOG_RING_ACQ_REL, bytes: BigInt(ringEntries * 16), withBitmap: true } : undefined,
          // First the guest touches all of its memory, as a booted OS with a page cache would have.
          workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: 1e8 },
        }),
      );
      // Until every page is mapped: a first touch costs what the hypervisor's cost model says (a calibrated host's may be 20 us).
      const pagesPerVcpu = Math.ceil(memory / 4096 / vcpus);
      let step = pagesPerVcpu * (10 + 2430) + 1e6;
      for (;;) {
        await setUp(() => source.advanceVm({ vm: "demo", durationNs: BigInt(Math.ceil(step)) }, { deadlineMs: 3_600_000, signal: interrupt.signal }));
        const slots = (await setUp(() => source.getVm({ vm: "demo" }))).vm!.memslots;
        const mapped = slots.reduce((n, s) => n + Number(s.mappedPages4k) + 512 * Number(s.mappedBlocks2m) + 262144 * Number(s.mappedBlocks1g), 0);
        const total = slots.reduce((n, s) => n + Number(s.numPages), 0);
        if (mapped >= total) break;
        step = (step * (total - mapped)) / Math.max(mapped, 1) + 1e6;
      }
      await setUp(() => source.setWorkload({ vm: "demo", workload: { pattern, writesPerSecond: rate, hotFraction: hot, hotWriteFraction: hotWrites, zipfSkew } }));
      if (noisy !== null) await setUp(() => source.setWorkload({ vm: "demo", vcpu: 0, workload: { pattern, writesPerSecond: noisy, hotFraction: hot, hotWriteFraction: hotWrites, zipfSkew } }));
      await setUp(() => source.advanceVm({ vm: "demo", durationNs: 1_000_000_000n }, { deadlineMs: 3_600_000, signal: interrupt.signal }));
      say(`migrating 'demo' with ${cfg.mechanism} over ${cfg.bandwidthBitsPerSecond / 1e9} Gbit/s, downtime limit ${cfg.downtimeLimitMs} ms`);
      return await runMigration(v, io, cfg, { source: "demo", destination: "demo" }, { source, destination }, interrupt.signal);
    } finally {
      source.close();
      destination.close();
    }
  } catch (err) {
    // Interrupted while setting up: nothing to clean but the processes below.
    if (interrupt.signal.aborted) {
      io.err.write(`demo interrupted by ${String(interrupt.signal.reason)} before the migration started\n`);
      return SIGNAL_EXIT[String(interrupt.signal.reason)] ?? EXIT.interrupted;
    }
    throw err;
  } finally {
    interrupt.dispose();
    // The device goes first: it unregisters from the hypervisor that is still there.
    for (const s of services.reverse()) await s.stop();
  }
}

async function runServe(v: Values, io: Io): Promise<number> {
  const cfg = policy(v);
  const a = v["hypervisor-a"] ?? io.env.MIGRATION_HYPERVISOR_A;
  const b = v["hypervisor-b"] ?? io.env.MIGRATION_HYPERVISOR_B;
  if (!a || !b) throw new UsageError("serve needs --hypervisor-a and --hypervisor-b (or MIGRATION_HYPERVISOR_A / _B)");
  let memory: number;
  try {
    memory = parseBytes(v.memory ?? "1GiB");
  } catch (e) {
    throw new UsageError(`--memory: ${(e as Error).message}`);
  }
  const port =
    v["http-port"] !== undefined
      ? number(v["http-port"], "http-port", 9480, (n) => Number.isInteger(n) && n >= 0 && n < 65536, "a port number")
      : envPort(io.env, "MIGRATION_HTTP_PORT", 9480);
  const service = new MigrationService(
    {
      hypervisors: [a, b],
      vm: v.vm ?? "demo",
      memoryBytes: memory,
      vcpus: number(v.vcpus, "vcpus", 2, (n) => Number.isInteger(n) && n >= 1 && n <= 512, "a whole number in [1, 512]"),
      writesPerSecond: number(v["write-rate"], "write-rate", 20_000, (n) => n >= 0 && n <= 1e9, "writes per second in [0, 1e9]"),
      hotFraction: number(v["hot-fraction"], "hot-fraction", 0.05, (n) => n > 0 && n <= 1, "in (0, 1]"),
      realtimeSpeed: number(v["realtime-speed"], "realtime-speed", 1, (n) => n > 0 && n <= 1000, "in (0, 1000]"),
      pauseMs: number(v["pause-ms"], "pause-ms", 2000, (n) => n >= 0, "a number of ms >= 0"),
      policy: cfg,
      clientOptions: clientOptions(v, io, cfg),
    },
    createLogger("migration-controller"),
  );
  let host: string;
  try {
    host = v.host ?? envHost(io.env, "MIGRATION_HOST");
  } catch (e) {
    throw new UsageError((e as ConfigError).message);
  }
  const bound = await service.listen(host, port).catch(async (err: NodeJS.ErrnoException) => {
    await service.stop();
    throw new ConfigError(`${v["http-port"] !== undefined ? "--http-port" : "MIGRATION_HTTP_PORT"}=${port}: cannot listen on ${host}:${port} for the ops port: ${err.code === "EADDRINUSE" ? "the address is in use" : err.message}`);
  });
  if (io.env.MIGRATION_ANNOUNCE === "1") io.out.write(JSON.stringify({ listening: { host, grpcPort: 0, httpPort: bound } }) + "\n");
  io.err.write(`serving: migrating '${v.vm ?? "demo"}' between ${a} and ${b} with ${cfg.mechanism}; metrics on http://${host}:${bound}/metrics\n`);
  service.start();
  await new Promise<void>((resolve) => {
    process.once("SIGTERM", resolve);
    process.once("SIGINT", resolve);
  });
  await service.stop();
  return EXIT.ok;
}

export async function runCli(argv: string[], io: Io): Promise<number> {
  if (argv[0] === "calibrate") return runCalibrate(argv.slice(1), io);
  let parsed;
  try {
    parsed = parseArgs({ args: argv, options: OPTIONS, allowPositionals: true, strict: true });
  } catch (e) {
    io.err.write(`${(e as Error).message}\nrun with --help for usage\n`);
    return EXIT.usage;
  }
  const { values: v, positionals } = parsed;
  if (v.help) {
    io.out.write(HELP + "\n");
    return EXIT.ok;
  }
  const command = positionals[0] ?? "migrate";
  try {
    if (positionals.length > 1) throw new UsageError(`unexpected argument '${positionals[1]}'`);
    if (command === "demo") return await runDemo(v, io);
    if (command === "migrate") return await runMigrate(v, io);
    if (command === "serve") return await runServe(v, io);
    if (command === "estimate") return await runEstimate(v, io);
    throw new UsageError(`unknown command '${command}' (use demo, migrate, serve, estimate or calibrate)`);
  } catch (err) {
    if (err instanceof UsageError) {
      io.err.write(`${err.message}\nrun with --help for usage\n`);
      return EXIT.usage;
    }
    if (err instanceof MigrationError) {
      io.err.write(`${err.message}\n`);
      return EXIT[err.kind];
    }
    if (err instanceof ConfigError) {
      io.err.write(`migration-controller: ${err.message}\n`);
      return EXIT.failed;
    }
    io.err.write(`error: ${(err as Error)?.message ?? String(err)}\n`);
    return EXIT.failed;
  }
}
