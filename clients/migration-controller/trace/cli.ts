/** `migration-controller record`: a running VM's dirtied pages, per interval, into a trace file (format.ts). */
import { writeFile } from "node:fs/promises";
import type { Io } from "../../../common/io.js";
import { connectHypervisor } from "../../../services/hypervisor/client.js";
import { checkOutputs, clientOptions, duration, EXIT, exitForRpcError, interruptOnSignals, number, SIGNAL_EXIT, UsageError, type Values } from "../flags.js";
import { SECURITY } from "../options.js";
import type { CommandSpec } from "../program.js";
import { formatBytes } from "../report.js";
import { encodeTrace } from "./format.js";
import { recordTrace } from "./record.js";

export const RECORD_COMMAND: CommandSpec = {
  name: "record",
  usage: "--vm <name> --out <file> [options]",
  summary: "record a running VM's dirtied pages per interval (a trace to replay)",
  description: "Records a running VM's dirtied pages per interval into a trace that --workload trace --trace FILE replays; logging is turned off again however it ends.",
  groups: [
    ["The VM and the trace:", [["source", "the VM's hypervisor (env: MIGRATION_SOURCE; default: 127.0.0.1:50051)"], ["vm", "the VM (required; not logging already)"], "interval", "intervals", "out"]],
    ["Security:", SECURITY],
  ],
  after: "exit codes: 0 recorded; 1 failed; 2 bad usage; 3 unreachable hypervisor, unknown VM or one already logging; 130/143 interrupted",
  run: (v, io) => runRecord(v, io),
};

export async function runRecord(v: Values, io: Io): Promise<number> {
  if (!v.vm) throw new UsageError("--vm NAME is required (the VM to record)");
  if (!v.out) throw new UsageError("--out FILE is required (where the trace goes)");
  const intervalMs = duration(v, "interval", { fallbackMs: 100, bare: "s", min: 1, max: 3_600_000 });
  const intervals = number(v.intervals, "intervals", 50, (n) => Number.isInteger(n) && n >= 1 && n <= 100_000, "a whole number in [1, 100000]");
  checkOutputs(v, ["out"]);
  const hv = connectHypervisor(v.source ?? io.env.MIGRATION_SOURCE ?? "127.0.0.1:50051", clientOptions(v, io, { rpcTimeoutMs: 10_000 }));
  const interrupt = interruptOnSignals();
  try {
    io.err.write(`recording '${v.vm}' for ${intervals} intervals of ${intervalMs} ms\n`);
    const t = await recordTrace(hv, v.vm, {
      intervalNs: Math.round(intervalMs * 1e6),
      intervals,
      signal: interrupt.signal,
      onInterval: (k) => (k + 1) % Math.max(1, Math.floor(intervals / 10)) === 0 && io.err.write(`  ${k + 1}/${intervals} intervals\n`),
    });
    if (interrupt.signal.aborted) {
      io.err.write(`record interrupted by ${String(interrupt.signal.reason)} after ${t.pages.length} intervals; logging is off again, nothing written\n`);
      return SIGNAL_EXIT[String(interrupt.signal.reason)] ?? EXIT.interrupted;
    }
    const bytes = encodeTrace(t);
    await writeFile(v.out, bytes);
    const pages = t.pages.reduce((n, row) => n + row.reduce((m, p) => m + p.length, 0), 0);
    io.out.write(`recorded ${pages.toLocaleString("en-US")} dirtied pages in ${t.pages.length} intervals of ${intervalMs} ms, ${t.perVm ? "per VM (no dirty rings: from the bitmap)" : `per vCPU (${t.vcpus}, from the dirty rings)`}: ${v.out} (${formatBytes(bytes.byteLength)})\n`);
    return EXIT.ok;
  } catch (err) {
    const e = err as { details?: string; message?: string };
    io.err.write(`record: ${e.details ?? e.message ?? String(err)}\n`);
    return exitForRpcError(err) ?? EXIT.failed;
  } finally {
    interrupt.dispose();
    hv.close();
  }
}
