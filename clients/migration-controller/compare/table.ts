/**
 * A comparison's results ranked, as a text table and as JSON (one record per
 * cell; QEMU's query-migrate names where they exist, units in "units").
 */
import { formatBytes } from "../report.js";
import type { CellResult } from "./run.js";

export const RANK_BY = {
  downtime: (r: CellResult) => r.downtimeMs ?? Infinity,
  "total-time": (r: CellResult) => r.totalTimeMs,
  slowdown: (r: CellResult) => r.guestSlowdown,
  "vcpu-time-lost": (r: CellResult) => r.vcpuTimeLostMs,
  transferred: (r: CellResult) => r.transferredBytes,
} as const;
export type RankBy = keyof typeof RANK_BY;

/** Verified cells first, by the figure, then total time, then the matrix's order; failed cells last. */
export function rank(results: CellResult[], by: RankBy): CellResult[] {
  const key = RANK_BY[by];
  const ok = (r: CellResult) => (r.status === "completed" && r.verified ? 0 : 1);
  return [...results].sort((a, b) => ok(a) - ok(b) || key(a) - key(b) || a.totalTimeMs - b.totalTimeMs || a.cell.index - b.cell.index);
}

const fmt = (n: number, d = 1) => n.toLocaleString("en-US", { maximumFractionDigits: d, minimumFractionDigits: d });
const gbit = (bps: number) => `${fmt(bps / 1e9, bps % 1e9 === 0 ? 0 : 2)}G`;

/** A cell's label: what varies in the matrix, shortest first. */
export function label(r: CellResult): string {
  const c = r.cell;
  return `${c.arch} ${c.mechanism.name} ${c.policy} ${gbit(c.config.bandwidthBitsPerSecond)} ${c.config.downtimeLimitMs}ms`;
}

const COLUMNS: [string, (r: CellResult) => string][] = [
  ["arch", (r) => r.cell.arch],
  ["mechanism", (r) => r.cell.mechanism.name],
  ["policy", (r) => r.cell.policy],
  ["link", (r) => `${gbit(r.cell.config.bandwidthBitsPerSecond)}bit/${fmt(r.cell.config.latencyNs / 1e6, 1)}ms/${r.cell.config.downtimeLimitMs}ms`],
  ["total s", (r) => fmt(r.totalTimeMs / 1e3, 2)],
  ["downtime ms", (r) => (r.downtimeMs === null ? "-" : fmt(r.downtimeMs))],
  ["syncs", (r) => String(r.dirtySyncCount)],
  ["sent", (r) => formatBytes(r.transferredBytes)],
  ["slowdown %", (r) => fmt(100 * r.guestSlowdown, 2)],
  ["vCPU lost ms", (r) => fmt(r.vcpuTimeLostMs)],
  ["sync host ms", (r) => fmt(r.syncHostMs, 2)],
  ["ring-full", (r) => String(r.ringFullExits)],
  ["PML-full", (r) => String(r.pmlFullExits)],
  ["HDBSS-full", (r) => String(r.hdbssFullFaults)],
  ["verified", (r) => (r.verified ? "yes" : "no")],
];

/** The ranked table's header and rows, as text cells (the text table's and the HTML page's). */
export function tableCells(ranked: CellResult[]): { head: string[]; rows: string[][] } {
  return { head: ["#", ...COLUMNS.map(([h]) => h)], rows: ranked.map((r, i) => [String(i + 1), ...COLUMNS.map(([, f]) => f(r))]) };
}

export function compareTable(ranked: CellResult[], by: RankBy): string {
  const { head, rows } = tableCells(ranked);
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((row) => row[i].length)));
  const left = new Set([1, 2, 3, 4]);
  const line = (row: string[]) => row.map((c, i) => (left.has(i) ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join("  ").trimEnd();
  const out = [`ranked by ${by} (verified cells first; ties by total time)`, line(head), ...rows.map(line)];
  for (const [i, r] of ranked.entries()) if (r.status === "failed") out.push(`#${i + 1} failed: ${r.error ?? "the destination differs from the source"}`);
  return out.join("\n");
}

export function compareJson(ranked: CellResult[], meta: Record<string, unknown>): object {
  return {
    ...meta,
    cells: ranked.map((r, i) => ({
      rank: i + 1,
      cell: r.cell.index,
      arch: r.cell.arch,
      mechanism: r.cell.mechanism.name,
      policy: r.cell.policy,
      bandwidth: r.cell.config.bandwidthBitsPerSecond,
      latency: r.cell.config.latencyNs / 1e6,
      "downtime-limit": r.cell.config.downtimeLimitMs,
      status: r.status,
      ...(r.error ? { error: r.error } : {}),
      "total-time": r.totalTimeMs,
      downtime: r.downtimeMs,
      "dirty-sync-count": r.dirtySyncCount,
      ram: { transferred: r.transferredBytes },
      "guest-slowdown": r.guestSlowdown,
      "vcpu-time-lost": r.vcpuTimeLostMs,
      "sync-host-time": r.syncHostMs,
      "ring-full-exits": r.ringFullExits,
      "pml-full-exits": r.pmlFullExits,
      "hdbss-full-faults": r.hdbssFullFaults,
      verified: r.verified,
      series: r.series.map((p) => ({ time: p.timeMs, remaining: p.remainingBytes, "dirty-pages-rate": p.dirtyRatePagesPerSecond })),
      "wall-time": r.wallTimeMs,
    })),
    units: {
      bandwidth: "bit/s",
      latency: "ms",
      "downtime-limit": "ms",
      "total-time": "ms (guest time)",
      downtime: "ms (guest time)",
      "ram.transferred": "bytes",
      "guest-slowdown": "fraction 0-1 of the writes the guest makes untracked that it did not make while tracked (pre-copy and post-copy rounds)",
      "vcpu-time-lost": "ms of guest time summed over vCPUs (faults, TLB refills, full rings, throttle and dirty-limit sleeps, post-copy waits)",
      "sync-host-time": "ms of host time in GET/CLEAR/harvest/reset",
      "ring-full-exits": "count (KVM_EXIT_DIRTY_RING_FULL)",
      "pml-full-exits": "count (PML buffer full)",
      "hdbss-full-faults": "count (HDBSS buffer full)",
      "series[].time": "ms (guest time of the sync)",
      "series[].remaining": "bytes",
      "series[].dirty-pages-rate": "pages/s",
      "wall-time": "ms (wall clock; varies between runs)",
    },
  };
}
