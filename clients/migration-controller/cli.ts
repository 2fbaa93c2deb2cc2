/**
 * The migration controller's command line: `migrate` a VM between two
 * hypervisors, or run the embedded `demo` (two hypervisors on 127.0.0.1, a
 * demo VM, a verified migration, a report). Returns an exit code; never
 * prints a stack trace for a user's mistake or a failed migration.
 */
import { writeFile } from "node:fs/promises";
import type { Io } from "../../common/io.js";
import { runCalibrate } from "../calibrate/calibrate.js";
import { ConfigError, envHost, envPort, parseBytes } from "../../common/config.js";
import { loadCostModel } from "../../services/hypervisor/model/cost-model.js";
import { spawnService, type SpawnedService } from "../../common/spawn.js";
import { DirtyRateMode, DirtyRateStatus, type DirtyRateInfo } from "../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { connectHypervisor, type HypervisorClient } from "../../services/hypervisor/client.js";
import { DEFAULT_CONFIG, explain, migrate, MigrationError, type CleanupReport, type MigrationConfig, type MigrationReport } from "./migrate.js";
import { createLogger } from "../../common/log.js";
import { progressPrinter } from "./progress.js";
import { MigrationService } from "./service.js";
import { htmlReport, jsonReport, textReport } from "./report.js";
import { parseMechanism } from "./trackers/index.js";
import { createDemoVm } from "./demo-vm.js";
import { COMPARE_COMMAND } from "./compare/cli.js";
import { PREDICT_COMMAND } from "./predict/cli.js";
import { RECORD_COMMAND } from "./trace/cli.js";
import { checkOutputs, clientOptions, duration, EXIT, exitFor, exitForRpcError, guestSpec, interruptOnSignals, number, policy, SIGNAL_EXIT, UsageError, type Values } from "./flags.js";
import { GUEST, OUTPUT, POLICY, SECURITY } from "./options.js";
import { runProgram, type CommandSpec, type ProgramSpec } from "./program.js";

export { EXIT };

const MIGRATION_EXITS = `exit codes: 0 migrated and verified; 1 other failure; 2 bad usage; 3 unreachable hypervisor, unknown VM
or a precondition (destination exists, slot already logging, over a hypervisor's memory budget);
4 did not converge (timeout); 5 verification failed (destination differs from source);
6 the VM was lost: a failure after the switch to post-copy (the source stays paused, the destination is kept, waiting on the missing pages);
130 / 143 interrupted by SIGINT / SIGTERM (the source is resumed, logging off, the destination removed).`;

const SECURITY_HEADING = "Security (flags win over the variables):";

export const COMMANDS: CommandSpec[] = [
  {
    name: "demo",
    summary: "run the embedded default: two hypervisors on 127.0.0.1, a demo VM, a verified migration, a report",
    groups: [
      ["The guest:", GUEST],
      ["Policy and link:", POLICY],
      ["Output:", OUTPUT],
    ],
    after: MIGRATION_EXITS,
    run: runDemo,
  },
  {
    name: "migrate",
    usage: "--vm <name> [options]",
    summary: "migrate a VM between running hypervisors",
    isDefault: true,
    groups: [
      ["The VM:", ["source", "destination", ["vm", "the VM to migrate (required)"], "dest-vm"]],
      ["Policy and link:", POLICY],
      [SECURITY_HEADING, SECURITY],
      ["Output:", OUTPUT],
    ],
    after: MIGRATION_EXITS,
    run: runMigrate,
  },
  COMPARE_COMMAND,
  PREDICT_COMMAND,
  RECORD_COMMAND,
  {
    name: "serve",
    usage: "--hypervisor-a <addr> --hypervisor-b <addr> [options]",
    summary: "keep a demo VM migrating back and forth between two hypervisors (real-time clock), metrics on /metrics",
    groups: [
      ["The service:", ["hypervisor-a", "hypervisor-b", "http-port", "grpc-port", "host", "realtime-speed", "pause-ms"]],
      [
        "The demo VM:",
        [
          ["vm", "its name (default: demo)"],
          ["memory", "its memory (default: 1GiB)"],
          ["vcpus", "its vCPUs, 1 to 512 (default: 2)"],
          ["write-rate", "its writes per second per vCPU, hot-cold (default: 20000)"],
          "hot-fraction",
        ],
      ],
      ["Policy and link:", POLICY],
      [SECURITY_HEADING, SECURITY],
    ],
    after: "env: LOG_LEVEL: fatal, error, warn, info (default), debug, trace or silent (serve's JSON log lines on stderr)\nexit codes: 0 stopped by SIGTERM or SIGINT; 1 failed; 2 bad usage",
    run: runServe,
  },
  {
    name: "estimate",
    usage: "--vm <name> [options]",
    summary: "measure a running VM's dirty rate (QEMU's calc-dirty-rate)",
    groups: [
      ["The measurement:", [["source", "the VM's hypervisor (env: MIGRATION_SOURCE; default: 127.0.0.1:50051)"], ["vm", "the VM to measure (required)"], "mode", "calc-time", "sample-pages"]],
      [SECURITY_HEADING, SECURITY],
      ["Output:", [["json", "write query-dirty-rate's answer as JSON (QEMU's names)"]]],
    ],
    after: "exit codes: 0 measured; 1 failed; 2 bad usage; 3 unreachable hypervisor, unknown VM or a precondition (dirty-ring mode without rings)",
    run: runEstimate,
  },
];

const PROGRAM: ProgramSpec = {
  name: "migration-controller",
  description: "Live migration of simulated VMs between hypervisors, with KVM's dirty-tracking mechanisms and QEMU's and KubeVirt's policies. Each command's --help lists its flags with their units, defaults and variables.",
  after: "Durations take ms, s, m or h (a bare number is in the unit the flag's help names), sizes KiB to TiB, rates bit/s or B/s with SI or binary prefixes.",
  commands: COMMANDS,
  external: [{ name: "calibrate", summary: "measure this host's KVM (/dev/kvm) and write a cost model that HYPERVISOR_COST_MODEL loads", run: runCalibrate }],
};

export type { Io };


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

async function writeOutputs(v: Values, report: MigrationReport, io: Io) {
  if (v.json) await writeFile(v.json, JSON.stringify(jsonReport(report), null, 2) + "\n");
  if (v.report) await writeFile(v.report, htmlReport(report, { logScale: v["log-scale"] }));
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

/** QEMU's calc-dirty-rate then query-dirty-rate, on one VM. */
async function runEstimate(v: Values, io: Io): Promise<number> {
  if (!v.vm) throw new UsageError("--vm NAME is required (the VM to measure)");
  const mode = DIRTY_RATE_MODES[v.mode ?? "page-sampling"];
  if (mode === undefined) throw new UsageError(`--mode ${v.mode}: must be one of ${Object.keys(DIRTY_RATE_MODES).join(", ")}`);
  // QEMU's calc-time is in seconds.
  const ms = duration(v, "calc-time", { fallbackMs: 1000, bare: "s", min: 50, max: 60_000, whole: true });
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
    const code = exitForRpcError(err);
    if (code === null) throw err;
    io.err.write(`estimate: ${(err as { details?: string }).details ?? String(err)}\n`);
    return code;
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

/** The demo VM's description from the flags; arch is the flag's or the mechanism's. */

async function runDemo(v: Values, io: Io): Promise<number> {
  const cfg = policy(v);
  const mechanism = parseMechanism(cfg.mechanism);
  const guest = guestSpec(v, mechanism);
  checkOutputs(v);
  const opts = clientOptions(v, io, cfg);
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
      say(`source ${src.address}, destination ${dst.address}; creating VM 'demo' (${guest.memoryBytes / 2 ** 30} GiB, ${guest.vcpus} vCPUs, ${guest.arch})`);
      await setUp(() => createDemoVm(source, "demo", guest, mechanism, { signal: interrupt.signal }));
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
  const portOf = (flag: "http-port" | "grpc-port", variable: string, fallback: number) =>
    v[flag] !== undefined ? number(v[flag], flag, fallback, (n) => Number.isInteger(n) && n >= 0 && n < 65536, "a port number") : envPort(io.env, variable, fallback);
  const port = portOf("http-port", "MIGRATION_HTTP_PORT", 9480);
  const grpcPort = portOf("grpc-port", "MIGRATION_GRPC_PORT", 50070);
  const service = new MigrationService(
    {
      hypervisors: [a, b],
      vm: v.vm ?? "demo",
      memoryBytes: memory,
      vcpus: number(v.vcpus, "vcpus", 2, (n) => Number.isInteger(n) && n >= 1 && n <= 512, "a whole number in [1, 512]"),
      writesPerSecond: number(v["write-rate"], "write-rate", 20_000, (n) => n >= 0 && n <= 1e9, "writes per second in [0, 1e9]"),
      hotFraction: number(v["hot-fraction"], "hot-fraction", 0.05, (n) => n > 0 && n <= 1, "in (0, 1]"),
      realtimeSpeed: number(v["realtime-speed"], "realtime-speed", 1, (n) => n > 0 && n <= 1000, "in (0, 1000]"),
      pauseMs: duration(v, "pause-ms", { fallbackMs: 2000, bare: "ms", min: 0 }),
      policy: cfg,
      clientOptions: clientOptions(v, io, cfg),
      costs: loadCostModel(io.env.HYPERVISOR_COST_MODEL),
    },
    createLogger("migration-controller"),
  );
  let host: string;
  try {
    host = v.host ?? envHost(io.env, "MIGRATION_HOST");
  } catch (e) {
    throw new UsageError((e as ConfigError).message);
  }
  const vars = { grpcPort: v["grpc-port"] !== undefined ? "--grpc-port" : "MIGRATION_GRPC_PORT", httpPort: v["http-port"] !== undefined ? "--http-port" : "MIGRATION_HTTP_PORT" };
  const bound = await service.listen({ host, grpcPort, httpPort: port, vars }).catch(async (err: unknown) => {
    await service.stop();
    throw err;
  });
  if (io.env.MIGRATION_ANNOUNCE === "1") io.out.write(JSON.stringify({ listening: { host, ...bound } }) + "\n");
  io.err.write(`serving: migrating '${v.vm ?? "demo"}' between ${a} and ${b} with ${cfg.mechanism}; PredictMigration on ${host}:${bound.grpcPort}, metrics on http://${host}:${bound.httpPort}/metrics\n`);
  service.start();
  await new Promise<void>((resolve) => {
    process.once("SIGTERM", resolve);
    process.once("SIGINT", resolve);
  });
  await service.stop();
  return EXIT.ok;
}

export async function runCli(argv: string[], io: Io): Promise<number> {
  try {
    return await runProgram(PROGRAM, argv, io);
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
