/** Progress on long work: one live line on a terminal, plain log lines otherwise. */
import type { ProgressEvent } from "./migrate.js";
import { formatBytes } from "./report.js";

export function progressPrinter(stream: NodeJS.WriteStream | { write(s: string): unknown; isTTY?: boolean }, quiet: boolean) {
  const tty = Boolean(stream.isTTY);
  let live = false;
  return {
    onProgress(e: ProgressEvent) {
      if (quiet) return;
      const t = `t=${(e.elapsedMs / 1e3).toFixed(2)}s`;
      let line: string;
      if (e.phase === "round" && e.round === 0) {
        line = `${t} round 0: sending all ${e.dirtyPages.toLocaleString("en-US")} pages (${formatBytes(e.remainingBytes)}) while the guest runs`;
      } else if (e.phase === "round") {
        line = `${t} sync ${e.round}: ${e.dirtyPages.toLocaleString("en-US")} dirty pages, remaining ${formatBytes(e.remainingBytes)}, dirty rate ${Math.round(e.dirtyRatePagesPerSecond).toLocaleString("en-US")} pages/s, expected downtime ${e.expectedDowntimeMs.toFixed(1)} ms, ${e.etaMs === null || e.etaMs === undefined ? "not converging at this rate" : `done in ~${(e.etaMs / 1e3).toFixed(1)} s`}${e.cpuThrottlePercentage ? `, vCPUs throttled ${e.cpuThrottlePercentage}%` : ""}${e.dirtyLimitMBps ? `, vCPUs limited to ${e.dirtyLimitMBps} MB/s` : ""}`;
      } else if (e.phase === "switchover") {
        line = `${t} switchover: pausing the source, final sync, copying ${formatBytes(e.remainingBytes)}`;
      } else if (e.phase === "postcopy") {
        line = `${t} postcopy-active: the guest runs on the destination; ${e.dirtyPages.toLocaleString("en-US")} pages (${formatBytes(e.remainingBytes)}) follow`;
      } else if (e.phase === "verify") {
        line = `${t} verifying: SHA-256 of both VMs' memory`;
      } else if (e.phase === "setup") {
        line = "setup: creating the destination, enabling dirty logging";
      } else {
        line = `${t} done`;
      }
      if (tty) {
        stream.write(`\r\x1b[K${line}`);
        live = true;
        if (e.phase === "done") {
          stream.write("\n");
          live = false;
        }
      } else {
        stream.write(`${line}\n`);
      }
    },
    /** Ends a live line before other output. */
    end() {
      if (live) stream.write("\n");
      live = false;
    },
  };
}
