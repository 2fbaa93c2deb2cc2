/**
 * Progress on long work. On a terminal, a live display (log-update) of two
 * lines fitted to its width: the round with a bar that moves chunk by chunk,
 * and the last sync's figures with the estimated time to completion. Not on a
 * terminal, one plain line per sync and phase.
 */
import { createLogUpdate } from "log-update";
import type { ProgressEvent } from "./migrate.js";
import { formatBytes } from "./report.js";

type Out = { write(s: string): unknown; isTTY?: boolean; columns?: number };

const n = (x: number) => Math.round(x).toLocaleString("en-US");
const eta = (e: ProgressEvent) => (e.etaMs === null || e.etaMs === undefined ? "not converging at this rate" : `done in ~${(e.etaMs / 1e3).toFixed(1)} s`);
const policy = (e: ProgressEvent) => `${e.cpuThrottlePercentage ? `, vCPUs throttled ${e.cpuThrottlePercentage}%` : ""}${e.dirtyLimitMBps ? `, vCPUs limited to ${e.dirtyLimitMBps} MB/s` : ""}`;

/** A phase's line, the same on a terminal and off it. */
function phaseLine(e: ProgressEvent): string {
  const t = `t=${(e.elapsedMs / 1e3).toFixed(2)}s`;
  if (e.phase === "round" && e.round === 0) return `${t} round 0: sending all ${n(e.dirtyPages)} pages (${formatBytes(e.remainingBytes)}) while the guest runs`;
  if (e.phase === "round") {
    return `${t} sync ${e.round}: ${n(e.dirtyPages)} dirty pages, remaining ${formatBytes(e.remainingBytes)}, dirty rate ${n(e.dirtyRatePagesPerSecond)} pages/s, expected downtime ${e.expectedDowntimeMs.toFixed(1)} ms, ${eta(e)}${policy(e)}`;
  }
  if (e.phase === "switchover") return `${t} switchover: pausing the source, final sync, copying ${formatBytes(e.remainingBytes)}`;
  if (e.phase === "postcopy") return `${t} postcopy-active: the guest runs on the destination; ${n(e.dirtyPages)} pages (${formatBytes(e.remainingBytes)}) follow`;
  if (e.phase === "verify") return `${t} verifying: SHA-256 of both VMs' memory`;
  if (e.phase === "setup") return "setup: creating the destination, enabling dirty logging";
  return `${t} done`;
}

const BAR = 20;

function bar(done: number, of: number): string {
  const f = of > 0 ? Math.min(1, done / of) : 1;
  const full = Math.round(f * BAR);
  return `[${"#".repeat(full)}${"-".repeat(BAR - full)}] ${String(Math.floor(f * 100)).padStart(3)}%`;
}

/** The live display's two lines, each cut to the terminal's width. */
export function liveLines(sync: ProgressEvent | null, now: ProgressEvent, columns: number): string[] {
  const t = `t=${(now.elapsedMs / 1e3).toFixed(2)}s`;
  const first =
    now.phase === "send"
      ? `round ${now.round} ${bar(now.passSentBytes ?? 0, now.passBytes ?? 0)} ${formatBytes(now.passSentBytes ?? 0)} of ${formatBytes(now.passBytes ?? 0)}  ${t}`
      : phaseLine(now);
  const second = sync && sync.round > 0 ? `sync ${sync.round}: ${formatBytes(sync.remainingBytes)} left, ${n(sync.dirtyRatePagesPerSecond)} pages/s, downtime ~${sync.expectedDowntimeMs.toFixed(0)} ms, ${eta(sync)}${policy(sync)}` : "";
  const fit = (s: string) => (s.length > columns - 1 ? `${s.slice(0, columns - 2)}…` : s);
  return [fit(first), ...(second ? [fit(second)] : [])];
}

export function progressPrinter(stream: Out, quiet: boolean) {
  const tty = Boolean(stream.isTTY);
  // A pseudo-terminal may report 0 rows or columns (script(1), some CI runners): log-update would then draw nothing.
  const view = { write: (s: string) => stream.write(s), get columns() { return stream.columns || 80; }, get rows() { return (stream as { rows?: number }).rows || 24; } };
  const live = tty ? createLogUpdate(view as unknown as NodeJS.WriteStream) : null;
  let lastSync: ProgressEvent | null = null;
  let shown = false;
  return {
    onProgress(e: ProgressEvent) {
      if (quiet) return;
      if (e.phase === "round") lastSync = e;
      if (!live) {
        // Off a terminal, the chunk-by-chunk updates would be noise.
        if (e.phase !== "send") stream.write(`${phaseLine(e)}\n`);
        return;
      }
      live(liveLines(lastSync, e, view.columns).join("\n"));
      shown = true;
      if (e.phase === "done") {
        live.done();
        shown = false;
      }
    },
    /** Leaves the live display in place before other output. */
    end() {
      if (live && shown) live.done();
      shown = false;
    },
  };
}
