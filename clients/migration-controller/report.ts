/**
 * What the user sees at the end: a text table per round with totals, the
 * machine-readable JSON (QEMU query-migrate's names, with every unit spelled
 * out in a "units" map), and a self-contained HTML page with charts of the
 * dirty rate and the remaining bytes per round.
 */
import type { MigrationReport, RoundReport } from "./migrate.js";
import { barChart, esc, lineChart } from "./charts.js";

const MiB = 2 ** 20;
const fmt = (n: number, d = 1) => n.toLocaleString("en-US", { maximumFractionDigits: d, minimumFractionDigits: 0 });

export function formatBytes(n: number): string {
  if (n >= 2 ** 30) return `${fmt(n / 2 ** 30, 2)} GiB`;
  if (n >= MiB) return `${fmt(n / MiB, 1)} MiB`;
  return `${fmt(n / 1024, 1)} KiB`;
}

const COLUMNS: [string, (r: RoundReport) => string][] = [
  ["round", (r) => `${r.round}${r.stopAndCopy ? "*" : r.postcopy ? "P" : r.endedMigration ? "x" : ""}`],
  ["dirty pages", (r) => fmt(r.dirtyPages, 0)],
  ["pages sent", (r) => fmt(r.pagesSent, 0)],
  ["MiB sent", (r) => fmt(r.bytesSent / MiB)],
  ["time ms", (r) => fmt(r.durationMs)],
  ["dirty rate pages/s", (r) => fmt(r.dirtyRatePagesPerSecond, 0)],
  ["remaining MiB", (r) => fmt(r.remainingBytes / MiB)],
  ["exp. downtime ms", (r) => fmt(r.expectedDowntimeMs)],
  ["guest writes/s", (r) => fmt(r.guestWritesPerSecond, 0)],
  ["ring-full exits", (r) => fmt(r.ringFullExits, 0)],
  ["ring stall ms", (r) => fmt(r.ringStallMs)],
  ["throttle %", (r) => String(r.cpuThrottlePercentage)],
  ["limit sleep µs/full", (r) => fmt(r.dirtyLimitThrottleTimePerRoundUs, 0)],
  ["vCPU dirty rates pages/s", (r) => r.vcpuDirtyRatesPagesPerSecond?.map((x) => fmt(x, 0)).join(" / ") ?? "-"],
];

/**
 * The ring columns only mean something with a dirty ring (the per-vCPU rates
 * come from it), the throttle column with auto-converge, the limit's with dirty-limit.
 */
const columnsFor = (r: MigrationReport) =>
  COLUMNS.filter(
    ([h]) =>
      (r.mechanism.startsWith("ring") || !(h.startsWith("ring") || h.startsWith("vCPU"))) &&
      (r.config.autoConverge !== null || h !== "throttle %") &&
      (r.config.dirtyLimit !== null || !h.startsWith("limit")),
  );

export function textReport(r: MigrationReport): string {
  const lines: string[] = [];
  const COLUMNS = columnsFor(r);
  const verdict =
    r.status === "completed"
      ? `completed, verified: sha256 ${r.verification!.sourceSha256.slice(0, 16)}… on both sides`
      : `FAILED: ${r.error}`;
  lines.push(`migration ${r.source.vm}@${r.source.address} -> ${r.destination.vm}@${r.destination.address} (${r.mechanism}, ${r.drive} clock): ${verdict}`);
  const rows = r.rounds.map((x) => COLUMNS.map(([, f]) => f(x)));
  const widths = COLUMNS.map(([h], i) => Math.max(h.length, ...rows.map((row) => row[i].length)));
  lines.push(COLUMNS.map(([h], i) => h.padStart(widths[i])).join("  "));
  for (const row of rows) lines.push(row.map((c, i) => c.padStart(widths[i])).join("  "));
  const so = r.switchover;
  if (r.rounds.some((x) => x.stopAndCopy)) lines.push("* stop-and-copy: the source was paused (downtime)");
  if (r.rounds.some((x) => x.endedMigration)) lines.push("x the round during which the migration ended (or the sync that ended it): what it sent until then");
  const pc = r.postcopy;
  if (pc) {
    lines.push(
      `P post-copy: ${fmt(pc.missingPages, 0)} pages missing at the switch followed in ${fmt(pc.durationMs)} ms (${fmt(pc.pushedPages, 0)} pushed, ${fmt(pc.requestedPages, 0)} requested${pc.preempt ? " on the preempt channel" : ""}); ` +
        `${fmt(pc.requests, 0)} page requests; blocktime ${fmt(pc.blocktimeMs)} ms with every vCPU waiting, per vCPU ${pc.vcpuBlocktimeMs.map((b) => fmt(b)).join(" / ")} ms`,
    );
  }
  lines.push(
    [
      `total time ${fmt(r.totalTimeMs / 1e3, 2)} s`,
      `downtime ${r.downtimeMs === null ? "-" : `${fmt(r.downtimeMs)} ms`} (limit ${r.config.downtimeLimitMs} ms)`,
      `syncs ${r.dirtySyncCount}`,
      `transferred ${formatBytes(r.transferredBytes)} of ${formatBytes(r.memoryBytes)}`,
      `${fmt(r.mbps, 0)} Mbit/s`,
    ].join(", "),
  );
  if (so?.postcopy) lines.push(`switch to post-copy after sync ${so.round}: ${formatBytes(so.remainingBytes)} dirty, threshold ${formatBytes(so.thresholdBytes)}`);
  else if (so) {
    lines.push(
      `switchover after sync ${so.round}: ${formatBytes(so.remainingBytes)} dirty ${so.forced ? "> (forced by --max-rounds)" : "<="} threshold ${formatBytes(so.thresholdBytes)} = bandwidth x downtime limit`,
    );
  }
  const speedup = r.wallTimeMs > 0 ? r.totalTimeMs / r.wallTimeMs : 0;
  lines.push(`wall clock ${fmt(r.wallTimeMs / 1e3, 2)} s for ${fmt(r.totalTimeMs / 1e3, 2)} s of guest time (${fmt(speedup)}x real time)`);
  const t = Object.entries(r.tracker);
  if (t.length) lines.push(`tracker: ${t.map(([k, v]) => `${k} ${fmt(v, 0)}`).join(", ")}`);
  return lines.join("\n");
}

/** The report as QEMU's query-migrate names it; units in "units". */
/** Keys whose unit suffix reads badly split (and QEMU's own name where it has one). */
const KEY_NAMES: Record<string, string> = {
  completionTimeoutPerGiBS: "completion-timeout-per-gib",
  progressTimeoutS: "progress-timeout",
  vcpuDirtyLimitMBps: "vcpu-dirty-limit",
};

/** camelCase and snake_case keys in kebab-case, as QEMU's QAPI names are, all the way down. */
export function kebab(v: unknown): unknown {
  if (Array.isArray(v)) return v.map(kebab);
  if (v === null || typeof v !== "object") return v;
  return Object.fromEntries(Object.entries(v).map(([k, x]) => [KEY_NAMES[k] ?? k.replace(/_/g, "-").replace(/([a-z0-9])([A-Z])/g, "$1-$2").toLowerCase(), kebab(x)]));
}

const int = (n: number) => Math.round(n);
const intOrNull = (n: number | null) => (n === null ? null : Math.round(n));

/**
 * query-migrate's answer: QEMU's names with QEMU's types (its int fields are
 * whole numbers here too; the exact values are in "x-exact"), kebab-case keys
 * throughout, and every numeric field's unit in "units".
 */
export function jsonReport(r: MigrationReport): object {
  const totalPages = r.memoryBytes / 4096;
  return {
    status: r.status,
    ...(r.error ? { error: r.error } : {}),
    "total-time": int(r.totalTimeMs),
    "setup-time": int(r.setupTimeMs),
    downtime: intOrNull(r.downtimeMs),
    "expected-downtime": intOrNull(r.expectedDowntimeMs),
    "cpu-throttle-percentage": int(r.cpuThrottlePercentage),
    "dirty-limit-throttle-time-per-round": int(r.dirtyLimitThrottleTimePerRoundUs),
    "dirty-limit-ring-full-time": int(r.dirtyLimitRingFullTimeUs),
    "vcpu-dirty-limit": int(r.dirtyLimitMBps),
    ...(r.postcopy ? { "postcopy-blocktime": int(r.postcopy.blocktimeMs), "postcopy-vcpu-blocktime": r.postcopy.vcpuBlocktimeMs.map(int) } : {}),
    ram: {
      transferred: int(r.transferredBytes),
      remaining: int(r.status === "completed" ? 0 : (r.rounds.at(-1)?.remainingBytes ?? r.memoryBytes)),
      total: r.memoryBytes,
      duplicate: r.zeroPages,
      normal: r.normalPages,
      "normal-bytes": r.normalPages * 4096,
      "dirty-pages-rate": int(r.dirtyRatePagesPerSecond),
      mbps: r.mbps,
      "dirty-sync-count": r.dirtySyncCount,
      "page-size": 4096,
      "precopy-bytes": int(r.precopyBytes),
      "downtime-bytes": int(r.downtimeBytes),
      "total-pages": totalPages,
      "postcopy-requests": r.postcopy?.requests ?? 0,
      "postcopy-bytes": int(r.postcopy?.bytes ?? 0),
    },
    "x-exact": {
      "total-time": r.totalTimeMs,
      "setup-time": r.setupTimeMs,
      downtime: r.downtimeMs,
      "expected-downtime": r.expectedDowntimeMs,
      "dirty-pages-rate": r.dirtyRatePagesPerSecond,
    },
    postcopy: kebab(r.postcopy),
    rounds: r.rounds.map((x) => ({
      round: x.round,
      "dirty-pages": x.dirtyPages,
      "pages-sent": x.pagesSent,
      normal: x.normalPages,
      duplicate: x.zeroPages,
      transferred: x.bytesSent,
      duration: x.durationMs,
      "sync-host-time": x.syncHostMs,
      "dirty-pages-rate": int(x.dirtyRatePagesPerSecond),
      "dirty-bytes-rate": int(x.dirtyRatePagesPerSecond * 4096),
      remaining: int(x.remainingBytes),
      threshold: int(x.thresholdBytes),
      "expected-downtime": int(x.expectedDowntimeMs),
      "estimated-time-to-completion": intOrNull(x.etaMs),
      "guest-writes-rate": int(x.guestWritesPerSecond),
      "ring-full-exits": x.ringFullExits,
      "ring-stall-time": x.ringStallMs,
      "pml-full-exits": x.pmlFullExits,
      "hdbss-full-faults": x.hdbssFullFaults,
      "stop-and-copy": x.stopAndCopy,
      postcopy: x.postcopy,
      "ended-migration": x.endedMigration,
      "fallback-syncs": x.fallbackSyncs,
      "cpu-throttle-percentage": x.cpuThrottlePercentage,
      "dirty-limit-throttle-time-per-round": int(x.dirtyLimitThrottleTimePerRoundUs),
      "dirty-limit-ring-full-time": int(x.dirtyLimitRingFullTimeUs),
      "vcpu-dirty-rate": x.vcpuDirtyRatesPagesPerSecond?.map((rate, id) => ({ id, "dirty-rate": int(rate) })) ?? null,
    })),
    policies: r.policies,
    switchover: kebab(r.switchover),
    verification: r.verification && {
      "source-sha256": r.verification.sourceSha256,
      "destination-sha256": r.verification.destinationSha256,
      match: r.verification.match,
    },
    cleanup: kebab(r.cleanup),
    source: r.source,
    destination: r.destination,
    mechanism: r.mechanism,
    drive: r.drive,
    config: kebab(r.config),
    tracker: kebab(r.tracker),
    "wall-time": r.wallTimeMs,
    units: JSON_UNITS,
  };
}

/** The unit of every numeric field of jsonReport, by its path (arrays as []). */
export const JSON_UNITS: Record<string, string> = {
  "total-time": "ms (guest time; x-exact.total-time unrounded)",
  "setup-time": "ms (guest time)",
  downtime: "ms (guest time from pausing the source to resuming the destination)",
  "expected-downtime": "ms (dirty bytes at the last sync / bandwidth)",
  "cpu-throttle-percentage": "% (auto-converge's vCPU throttle at the end of pre-copy; per round: during it)",
  "dirty-limit-throttle-time-per-round": "µs (dirty-limit: the longest sleep a vCPU takes after each full ring, at the last sync; per round: at its sync)",
  "dirty-limit-ring-full-time": "µs (dirty-limit: the time to fill a ring at the vCPUs' mean measured rate)",
  "vcpu-dirty-limit": "MB/s (dirty-limit's per-vCPU limit in service; 0: none)",
  "postcopy-blocktime": "ms (guest time every vCPU of the destination waited for a page at once)",
  "postcopy-vcpu-blocktime[]": "ms per vCPU (guest time each waited for pages)",
  "ram.transferred": "bytes",
  "ram.remaining": "bytes",
  "ram.total": "bytes",
  "ram.duplicate": "pages (zero pages)",
  "ram.normal": "pages",
  "ram.normal-bytes": "bytes",
  "ram.dirty-pages-rate": "pages/s",
  "ram.mbps": "Mbit/s",
  "ram.dirty-sync-count": "count",
  "ram.page-size": "bytes",
  "ram.precopy-bytes": "bytes",
  "ram.downtime-bytes": "bytes",
  "ram.total-pages": "pages",
  "ram.postcopy-requests": "count (page requests the destination's vCPUs raised after the switch)",
  "ram.postcopy-bytes": "bytes (sent after the switch to post-copy)",
  "x-exact.total-time": "ms",
  "x-exact.setup-time": "ms",
  "x-exact.downtime": "ms",
  "x-exact.expected-downtime": "ms",
  "x-exact.dirty-pages-rate": "pages/s",
  "postcopy.duration-ms": "ms (guest time from the switch until the last page landed)",
  "postcopy.missing-pages": "pages",
  "postcopy.requests": "count",
  "postcopy.requested-pages": "pages",
  "postcopy.pushed-pages": "pages",
  "postcopy.duplicate-pages": "pages (copies the destination dropped: the page was there)",
  "postcopy.bytes": "bytes",
  "postcopy.blocktime-ms": "ms",
  "postcopy.vcpu-blocktime-ms[]": "ms per vCPU",
  "rounds[].round": "count (0: the full copy; i: what sync i found)",
  "rounds[].dirty-pages": "pages",
  "rounds[].pages-sent": "pages",
  "rounds[].normal": "pages",
  "rounds[].duplicate": "pages (zero pages)",
  "rounds[].transferred": "bytes",
  "rounds[].duration": "ms (guest time)",
  "rounds[].sync-host-time": "ms (host time)",
  "rounds[].dirty-pages-rate": "pages/s",
  "rounds[].dirty-bytes-rate": "bytes/s",
  "rounds[].remaining": "bytes",
  "rounds[].threshold": "bytes",
  "rounds[].expected-downtime": "ms",
  "rounds[].estimated-time-to-completion": "ms of guest time still needed, estimated at the round's sync (eta.ts; null: not converging at that rate, round 0, stop-and-copy)",
  "rounds[].guest-writes-rate": "writes/s (guest time)",
  "rounds[].ring-full-exits": "count (KVM_EXIT_DIRTY_RING_FULL)",
  "rounds[].ring-stall-time": "ms (guest time vCPUs spent out on full rings)",
  "rounds[].pml-full-exits": "count (Intel PML buffer full)",
  "rounds[].hdbss-full-faults": "count (FEAT_HDBSS buffer full)",
  "rounds[].fallback-syncs": "count (syncs in the middle of the round's pass: auto-converge's 5 s timer)",
  "rounds[].cpu-throttle-percentage": "% (auto-converge's vCPU throttle during the round)",
  "rounds[].dirty-limit-throttle-time-per-round": "µs",
  "rounds[].dirty-limit-ring-full-time": "µs",
  "rounds[].vcpu-dirty-rate[].id": "vCPU index",
  "rounds[].vcpu-dirty-rate[].dirty-rate": "pages/s since the previous sync (from the dirty ring; the list is null with other mechanisms)",
  "switchover.round": "count (the sync after which the switchover happened)",
  "switchover.remaining-bytes": "bytes",
  "switchover.threshold-bytes": "bytes",
  "config.bandwidth-bits-per-second": "bit/s",
  "config.latency-ns": "ns",
  "config.downtime-limit-ms": "ms",
  "config.max-rounds": "count (null: no cap)",
  "config.progress-timeout": "s of guest time",
  "config.completion-timeout-per-gib": "s of guest time per GiB",
  "config.chunk-pages": "pages",
  "config.rpc-timeout-ms": "ms (wall clock)",
  "config.auto-converge.throttle-trigger-threshold": "%",
  "config.auto-converge.cpu-throttle-initial": "%",
  "config.auto-converge.cpu-throttle-increment": "%",
  "config.auto-converge.max-cpu-throttle": "%",
  "config.dirty-limit.throttle-trigger-threshold": "%",
  "config.dirty-limit.vcpu-dirty-limit": "MB/s",
  "config.dirty-limit.period-ms": "ms",
  "config.postcopy.after-rounds": "count of syncs (null: when a sync finds no fewer bytes dirty than the one before)",
  "tracker.*": "count (calls, entries, pages or exits, as each name says)",
  "wall-time": "ms (wall clock)",
};

/** Guest time at which each round began (its sync's), in seconds. */
function roundStarts(r: MigrationReport): number[] {
  let t = r.setupTimeMs;
  return r.rounds.map((x) => {
    const at = t;
    t += x.durationMs;
    return at / 1e3;
  });
}

export interface HtmlOptions {
  /** The remaining bytes on a log scale (a migration whose dirty set spans orders of magnitude). */
  logScale?: boolean;
}

export function htmlReport(r: MigrationReport, opts: HtmlOptions = {}): string {
  const COLUMNS = columnsFor(r);
  const rows = r.rounds.map((x) => `<tr>${COLUMNS.map(([, f]) => `<td>${esc(f(x))}</td>`).join("")}</tr>`).join("\n");
  const status = r.status === "completed" ? `<p class="ok">Completed and verified: SHA-256 ${esc(r.verification!.sourceSha256)} on both sides.</p>` : `<p class="bad">Failed: ${esc(r.error ?? "")}</p>`;
  const threshold = r.rounds[0]?.thresholdBytes ?? 0;
  const starts = roundStarts(r);
  const at = (f: (x: RoundReport) => number) => r.rounds.map((x, i) => [starts[i], f(x)] as [number, number]);
  const byRound = r.rounds.map((x, i) => `${x.round}${x.stopAndCopy ? "*" : x.postcopy ? "P" : x.endedMigration ? "x" : ""} @ ${fmt(starts[i], 2)} s`);
  const linkMiBps = r.config.bandwidthBitsPerSecond / 8 / MiB;
  const exits = [
    { name: "ring-full exits", values: r.rounds.map((x) => x.ringFullExits) },
    { name: "PML-full exits", values: r.rounds.map((x) => x.pmlFullExits) },
    { name: "HDBSS-full faults", values: r.rounds.map((x) => x.hdbssFullFaults) },
  ].filter((s) => s.values.some((v) => v > 0));
  const perRound = (title: string, unit: string, values: number[]) => barChart({ title: `${title} (${unit})`, unit, categories: byRound, values: values.map((v) => (Math.abs(v) >= 100 ? Math.round(v) : Number(v.toFixed(2)))) });
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Migration ${esc(r.source.vm)} -> ${esc(r.destination.vm)}</title>
<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:72em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
.ok{color:#166534}.bad{color:#b91c1c}figure{margin:1em 0}dl{display:grid;grid-template-columns:max-content auto;gap:2px 1em}dt{font-weight:bold}</style></head>
<body><h1>Migration ${esc(r.source.vm)} → ${esc(r.destination.vm)}</h1>
${status}
<dl><dt>mechanism</dt><dd>${esc(r.mechanism)} (${esc(r.drive)} clock)</dd>
<dt>source</dt><dd>${esc(r.source.vm)} @ ${esc(r.source.address)}</dd><dt>destination</dt><dd>${esc(r.destination.vm)} @ ${esc(r.destination.address)}</dd>
<dt>guest memory</dt><dd>${esc(formatBytes(r.memoryBytes))}</dd>
<dt>link</dt><dd>${fmt(r.config.bandwidthBitsPerSecond / 1e9, 2)} Gbit/s, ${fmt(r.config.latencyNs / 1e6, 3)} ms latency</dd>
<dt>total time</dt><dd>${fmt(r.totalTimeMs)} ms</dd><dt>downtime</dt><dd>${r.downtimeMs === null ? "-" : `${fmt(r.downtimeMs)} ms`} (limit ${r.config.downtimeLimitMs} ms)</dd>
<dt>syncs</dt><dd>${r.dirtySyncCount}</dd><dt>transferred</dt><dd>${esc(formatBytes(r.transferredBytes))}</dd></dl>
${lineChart({ title: "Remaining (dirty) at each sync (MiB)", xName: "guest time (s)", yName: "MiB", log: opts.logScale, series: [{ name: "remaining", points: at((x) => x.remainingBytes / MiB) }], refs: [{ value: threshold / MiB, name: `switchover threshold = bandwidth x downtime limit (${fmt(threshold / MiB)} MiB)` }] })}
${lineChart({ title: "Dirty rate at each sync (MiB/s)", xName: "guest time (s)", yName: "MiB/s", series: [{ name: "dirty rate", points: at((x) => (x.dirtyRatePagesPerSecond * 4096) / MiB) }], refs: [{ value: linkMiBps, name: `link rate (${fmt(linkMiBps)} MiB/s)` }] })}
${perRound("Guest writes in each round", "writes/s", r.rounds.map((x) => x.guestWritesPerSecond))}
${exits.length ? barChart({ title: "Exits in each round (count)", unit: "count", categories: byRound, series: exits }) : ""}
${r.rounds.some((x) => x.ringStallMs > 0) ? perRound("Guest time vCPUs stalled on full rings in each round", "ms", r.rounds.map((x) => x.ringStallMs)) : ""}
${r.config.autoConverge ? perRound("vCPU throttle in each round (auto-converge)", "%", r.rounds.map((x) => x.cpuThrottlePercentage)) : ""}
${r.postcopy ? `<h2>Post-copy</h2><p>${esc(textReport(r).split("\n").find((l) => l.startsWith("P post-copy")) ?? "")}</p>
${barChart({ title: "Post-copy blocktime per vCPU (ms)", unit: "ms", categories: r.postcopy.vcpuBlocktimeMs.map((_, i) => `vCPU ${i}`), values: r.postcopy.vcpuBlocktimeMs.map((v) => Number(v.toFixed(2))) })}` : ""}
${r.config.dirtyLimit ? perRound(`Sleep per full ring at each sync (dirty-limit, ${r.config.dirtyLimit.vcpuDirtyLimitMBps} MB/s per vCPU)`, "µs", r.rounds.map((x) => x.dirtyLimitThrottleTimePerRoundUs)) : ""}
<table><thead><tr>${COLUMNS.map(([h]) => `<th>${esc(h)}</th>`).join("")}</tr></thead><tbody>
${rows}
</tbody></table>
<p>All times are guest (simulated) time. Generated by the migration controller.</p>
</body></html>
`;
}
