/**
 * `migration-controller calibrate`: measure this host's KVM with the
 * project's own harness (kvm-harness.c, compiled here with cc), check that
 * no dirty page was lost, fit the cost model to the measurements
 * (services/hypervisor/model/calibration.ts) and write it as a file that
 * HYPERVISOR_COST_MODEL loads, beside a measurements file that `npm run
 * fidelity` reads for the figures the fit held back.
 */
import { spawn, spawnSync } from "node:child_process";
import { accessSync, constants, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { release, tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { parseArgs } from "node:util";
import type { Io } from "../../common/io.js";
import { fitCostModel, hostFromHarness, type FittedCosts, type HarnessReport } from "../../services/hypervisor/model/calibration.js";
import { DEFAULT_COSTS, loadCostModel } from "../../services/hypervisor/model/cost-model.js";

const HARNESS_SOURCE = new URL("kvm-harness.c", import.meta.url).pathname;

export const CALIBRATE_EXIT = { ok: 0, failed: 1, usage: 2, noKvm: 3, lostPages: 5 } as const;

const HELP = `usage: migration-controller calibrate [options]      (npm run calibrate -- [options])

Measures this host's KVM dirty-logging costs by driving /dev/kvm with a
minimal x86-64 guest (a CPL3 long-mode loop), checks that no dirty page was
lost, and writes a cost model fitted to them. Run the hypervisor with it:
HYPERVISOR_COST_MODEL=FILE npm run hypervisor. Needs read-write /dev/kvm and a
C compiler, on an x86-64 host; without /dev/kvm (or on another
architecture) it says so and exits 3.

options:
  --slot-mib N        size of the measured memslot in MiB, even, 2..1024 (default 256)
  --reps N            repetitions of each measurement, 1..100 (default 5; medians are fitted)
  --out FILE          the cost model to write (default host-cost-model.json)
  --measurements FILE the harness's measurements and the host description
                      (default: FILE of --out with .measurements.json)
  --cc PATH           the C compiler (env CC; default cc)
  --device PATH       the KVM device (default /dev/kvm)
  -h, --help          this help

exit codes: 0 written, 1 failed, 2 usage, 3 no /dev/kvm, 5 KVM lost dirty pages`;

const OPTIONS = {
  "slot-mib": { type: "string" },
  reps: { type: "string" },
  out: { type: "string" },
  measurements: { type: "string" },
  cc: { type: "string" },
  device: { type: "string" },
  help: { type: "boolean", short: "h" },
} as const;

/** What KVM this host has: the modules loaded and the parameters that decide how dirty logging works. */
export interface KvmDescription {
  kernel: string;
  modules: string[];
  parameters: Record<string, string>;
  summary: string;
}

export function describeKvm(sys = "/sys/module"): KvmDescription {
  const modules = existsSync(sys) ? readdirSync(sys).filter((m) => /^kvm/.test(m)).sort() : [];
  const parameters: Record<string, string> = {};
  const wanted: Record<string, string[]> = { kvm: ["tdp_mmu", "eager_page_split"], kvm_intel: ["ept", "pml"], kvm_amd: ["npt"], kvm_pvm: ["pvm_native"] };
  for (const [m, names] of Object.entries(wanted))
    for (const n of names) {
      const f = join(sys, m, "parameters", n);
      if (existsSync(f)) parameters[`${m}.${n}`] = readFileSync(f, "utf8").trim();
    }
  const on = (k: string) => ["Y", "1"].includes(parameters[k] ?? "");
  let summary: string;
  if (modules.includes("kvm_pvm")) summary = "kvm_pvm: software virtualization with shadow paging (no EPT/NPT, no PML); dirty logging write-protects shadow PTEs";
  else if (modules.includes("kvm_intel")) summary = `kvm_intel: EPT ${on("kvm_intel.ept") ? "on" : "off"}, PML ${on("kvm_intel.pml") ? "on" : "off"}`;
  else if (modules.includes("kvm_amd")) summary = `kvm_amd: NPT ${on("kvm_amd.npt") ? "on" : "off"} (no PML)`;
  else summary = modules.length ? modules.join(", ") : "no KVM module loaded";
  if ("kvm.tdp_mmu" in parameters) summary += `; TDP MMU ${on("kvm.tdp_mmu") ? "on" : "off"}, eager page split ${on("kvm.eager_page_split") ? "on" : "off"}`;
  return { kernel: release(), modules, parameters, summary };
}

function intIn(v: string | undefined, name: string, fallback: number, ok: (n: number) => boolean, what: string): number {
  if (v === undefined) return fallback;
  const n = Number(v);
  if (!Number.isInteger(n) || !ok(n)) throw new RangeError(`--${name} must be ${what} (got '${v}')`);
  return n;
}

/** Compiles the harness into a temporary directory; the caller removes it. */
function compileHarness(cc: string): { dir: string; exe: string } {
  const dir = mkdtempSync(join(tmpdir(), "kvm-harness-"));
  const exe = join(dir, "kvm-harness");
  const r = spawnSync(cc, ["-O2", "-pthread", "-Wall", "-o", exe, HARNESS_SOURCE], { encoding: "utf8" });
  if (r.error || r.status !== 0) {
    rmSync(dir, { recursive: true, force: true });
    const why = r.error ? (r.error as NodeJS.ErrnoException).code === "ENOENT" ? `${cc} not found (install a C compiler: apt-get install -y gcc)` : r.error.message : r.stderr.trim();
    throw new Error(`cannot compile the harness: ${why}`);
  }
  return { dir, exe };
}

/** Runs the harness, relaying its phase lines as progress; resolves with its report. */
function runHarness(exe: string, args: string[], progress: (line: string) => void, signal?: AbortSignal): Promise<HarnessReport> {
  return new Promise((resolve, reject) => {
    const child = spawn(exe, args, { stdio: ["ignore", "pipe", "pipe"], signal });
    let stdout = "";
    const errors: string[] = [];
    child.stdout.setEncoding("utf8").on("data", (d: string) => (stdout += d));
    createInterface({ input: child.stderr }).on("line", (l) => (l.startsWith("phase ") ? progress(l) : errors.push(l)));
    child.on("error", reject);
    child.on("close", (code) => {
      // Exit 4 is a report of lost pages: the report still comes, and the caller fails on it.
      if (code !== 0 && code !== 4) return reject(new Error(`the harness failed (exit ${code}): ${errors.join("; ") || "no message"}`));
      try {
        resolve(JSON.parse(stdout) as HarnessReport);
      } catch (e) {
        reject(new Error(`the harness printed no report: ${(e as Error).message}`));
      }
    });
  });
}

export interface CalibrationResult {
  report: HarnessReport;
  kvm: KvmDescription;
  /** null when KVM lost dirty pages: such a host's figures are not a model of it. */
  costs: FittedCosts | null;
  /** Parts the fit set to 0 because they came out negative (below this run's noise), with the value they came out at. */
  clamped: Record<string, number>;
}

/** Measures and fits; throws on a host without /dev/kvm (code ENOKVM) or a report that cannot be fitted. */
export async function calibrate(opts: { slotMib: number; reps: number; cc: string; device?: string; progress?: (line: string) => void; signal?: AbortSignal }): Promise<CalibrationResult> {
  // The harness's guest is x86-64 code run natively: an arm64 KVM needs a harness of its own.
  if (process.arch !== "x64") throw Object.assign(new Error(`calibrate drives an x86-64 guest; this host is ${process.arch}`), { code: "ENOKVM" });
  const device = opts.device ?? "/dev/kvm";
  try {
    accessSync(device, constants.R_OK | constants.W_OK);
  } catch (e) {
    throw Object.assign(new Error(`no usable ${device} on this host (${(e as NodeJS.ErrnoException).code}): calibration measures a real KVM, and this host offers none to this user`), { code: "ENOKVM" });
  }
  const { dir, exe } = compileHarness(opts.cc);
  try {
    const report = await runHarness(exe, ["--device", device, "--slot-mib", String(opts.slotMib), "--reps", String(opts.reps)], opts.progress ?? (() => {}), opts.signal);
    const kvm = describeKvm();
    if (report.lost_pages > 0) return { report, kvm, costs: null, clamped: {} };
    const native = report.measurements.pf_fixed_per_fault?.median;
    if (native !== undefined && Math.abs(native - 1) > 0.05)
      throw new Error(`the harness's guest did not take one write-protection fault per page (pf_fixed per page ${native}): KVM emulated it, and its figures would say nothing about dirty logging`);
    const clamped: Record<string, number> = {};
    const costs = fitCostModel(hostFromHarness(report), (part, ns) => (clamped[part] = ns));
    return { report, kvm, costs, clamped };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

const fmt = (ns: number) => (ns >= 1e6 ? `${(ns / 1e6).toFixed(3)} ms` : ns >= 1e3 ? `${(ns / 1e3).toFixed(2)} us` : `${ns.toFixed(2)} ns`);

export async function runCalibrate(argv: string[], io: Io): Promise<number> {
  let v;
  try {
    v = parseArgs({ args: argv, options: OPTIONS, strict: true, allowPositionals: false }).values;
  } catch (e) {
    io.err.write(`${(e as Error).message}\nrun calibrate --help for usage\n`);
    return CALIBRATE_EXIT.usage;
  }
  if (v.help) {
    io.out.write(HELP + "\n");
    return CALIBRATE_EXIT.ok;
  }
  let slotMib: number, reps: number;
  try {
    slotMib = intIn(v["slot-mib"], "slot-mib", 256, (n) => n >= 2 && n <= 1024 && n % 2 === 0, "an even number of MiB from 2 to 1024");
    reps = intIn(v.reps, "reps", 5, (n) => n >= 1 && n <= 100, "an integer from 1 to 100");
  } catch (e) {
    io.err.write(`${(e as Error).message}\nrun calibrate --help for usage\n`);
    return CALIBRATE_EXIT.usage;
  }
  const out = v.out ?? "host-cost-model.json";
  const measurementsFile = v.measurements ?? out.replace(/\.json$/, "") + ".measurements.json";
  for (const f of [out, measurementsFile]) {
    try {
      accessSync(dirname(resolve(f)), constants.W_OK);
    } catch (e) {
      io.err.write(`cannot write ${f}: ${(e as NodeJS.ErrnoException).code === "ENOENT" ? "no such directory" : (e as Error).message}\n`);
      return CALIBRATE_EXIT.usage;
    }
  }
  const started = Date.now();
  const say = (s: string) => io.err.write(`calibrate: ${s}\n`);
  say(`measuring a ${slotMib} MiB slot, ${reps} repetitions of each figure, in 6 phases`);
  const abort = new AbortController();
  const onSignal = () => abort.abort();
  process.once("SIGINT", onSignal);
  process.once("SIGTERM", onSignal);
  let result: CalibrationResult;
  try {
    result = await calibrate({ slotMib, reps, cc: v.cc ?? io.env.CC ?? "cc", device: v.device, signal: abort.signal, progress: (l) => say(`${l} (${((Date.now() - started) / 1000).toFixed(0)} s)`) });
  } catch (e) {
    const err = e as Error & { code?: string };
    say(err.code === "ABORT_ERR" ? "interrupted; nothing written" : err.message);
    return err.code === "ENOKVM" ? CALIBRATE_EXIT.noKvm : CALIBRATE_EXIT.failed;
  } finally {
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
  }
  const { report, kvm, costs, clamped } = result;
  writeFileSync(measurementsFile, JSON.stringify({ $comment: "kvm-harness measurements (ns; medians fitted); read by npm run fidelity", kvm, ...report }, null, 2) + "\n");
  if (costs === null) {
    say(`KVM lost ${report.lost_pages} dirty pages: a page the guest wrote was missing from the dirty log. No cost model written; the measurements are in ${measurementsFile}`);
    return CALIBRATE_EXIT.lostPages;
  }
  const file = {
    $comment: `cost model fitted by migration-controller calibrate on ${new Date().toISOString()}; load with HYPERVISOR_COST_MODEL`,
    $host: kvm.summary,
    $measurements: measurementsFile,
    ...(Object.keys(clamped).length ? { $clamped: clamped } : {}),
    ...costs,
  };
  writeFileSync(out, JSON.stringify(file, null, 2) + "\n");
  loadCostModel(out); // what the hypervisor will load: a file it refuses is not written silently
  io.out.write(`KVM on this host: ${kvm.summary} (kernel ${kvm.kernel})\nno dirty page lost in any mode\n\n`);
  io.out.write(`${"part".padEnd(28)}${"default (reference host)".padStart(26)}${"this host".padStart(14)}${"ratio".padStart(8)}\n`);
  for (const [k, ns] of Object.entries(costs)) {
    const d = DEFAULT_COSTS[k as keyof typeof DEFAULT_COSTS];
    io.out.write(`${k.padEnd(28)}${fmt(d).padStart(26)}${fmt(ns).padStart(14)}${(d > 0 ? (ns / d).toFixed(2) : "-").padStart(8)}\n`);
  }
  for (const [k, ns] of Object.entries(clamped))
    io.out.write(`${k} came out at ${fmt(ns)}, below this run's noise: set to 0 (more --reps or a larger --slot-mib separate it)\n`);
  io.out.write(`\nwrote ${out} (HYPERVISOR_COST_MODEL=${out}) and ${measurementsFile} in ${((Date.now() - started) / 1000).toFixed(1)} s\n`);
  return CALIBRATE_EXIT.ok;
}
