/**
 * A comparison as one self-contained HTML page: the ranked table, the bytes
 * still to send and the dirty rate over guest time for every cell on shared
 * axes, and one bar chart per figure. Charts are ECharts rendered to SVG on
 * the server, so the page needs no script and no network.
 */
import * as echarts from "echarts";
import { formatBytes } from "../report.js";
import { label, tableCells, type RankBy } from "./table.js";
import type { CellResult } from "./run.js";

const esc = (s: string) => s.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]!);
const MiB = 2 ** 20;

function svg(option: echarts.EChartsCoreOption, width: number, height: number): string {
  const chart = echarts.init(null, null, { renderer: "svg", ssr: true, width, height });
  chart.setOption({ animation: false, textStyle: { fontFamily: "system-ui, sans-serif" }, ...option });
  const out = chart.renderToSVGString();
  chart.dispose();
  return `<figure>${out}</figure>`;
}

/** One line per cell over guest time; the legend beside it holds every cell, one a line. */
function lines(title: string, unit: string, results: CellResult[], y: (p: CellResult["series"][number]) => number, opts: { log?: boolean; ref?: { value: number; name: string } } = {}): string {
  const height = Math.max(340, 80 + 18 * results.length);
  const series = results.map((r) => ({ name: label(r), type: "line", symbolSize: 4, data: r.series.map((p) => [p.timeMs / 1e3, opts.log ? Math.max(y(p), 1e-3) : y(p)]) }));
  if (opts.ref) series.push({ name: opts.ref.name, type: "line", symbolSize: 0, data: [], markLine: { symbol: "none", lineStyle: { type: "dashed", color: "#dc2626" }, label: { formatter: opts.ref.name, position: "insideEndTop", color: "#dc2626" }, data: [{ yAxis: opts.ref.value }] } } as never);
  return svg(
    {
      title: { text: `${title} (${unit})`, left: 10, textStyle: { fontSize: 14 } },
      grid: { left: 70, right: 400, top: 56, bottom: 50 },
      legend: { orient: "vertical", right: 10, top: 50, itemWidth: 18, itemGap: 4, textStyle: { fontSize: 11 } },
      xAxis: { type: "value", name: "guest time (s)", nameLocation: "middle", nameGap: 26 },
      yAxis: { type: opts.log ? "log" : "value", name: unit, nameLocation: "end" },
      series,
    },
    1100,
    height,
  );
}

/** One bar per cell, in rank order. */
function bars(title: string, unit: string, results: CellResult[], value: (r: CellResult) => number): string {
  const names = results.map((r, i) => `#${i + 1} ${label(r)}`);
  return svg(
    {
      title: { text: `${title} (${unit})`, left: 10, textStyle: { fontSize: 14 } },
      grid: { left: 320, right: 60, top: 36, bottom: 30 },
      xAxis: { type: "value", name: unit },
      yAxis: { type: "category", data: names, inverse: true, axisLabel: { fontSize: 11 } },
      series: [{ type: "bar", data: results.map((r) => ({ value: value(r), itemStyle: { color: r.status === "completed" && r.verified ? "#3b82f6" : "#dc2626" } })), label: { show: true, position: "right", fontSize: 10 } }],
    },
    900,
    70 + 20 * results.length,
  );
}

export function compareHtml(ranked: CellResult[], meta: { title: string; guest: string; by: RankBy }): string {
  const cells = tableCells(ranked);
  const round = (d: number) => (n: number) => Number(n.toFixed(d));
  const thresholds = [...new Set(ranked.map((r) => (r.cell.config.bandwidthBitsPerSecond / 8) * (r.cell.config.downtimeLimitMs / 1e3)))];
  const ref = thresholds.length === 1 ? { value: thresholds[0] / MiB, name: `switchover threshold ${formatBytes(thresholds[0])}` } : undefined;
  const failed = ranked.filter((r) => r.status === "failed");
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>${esc(meta.title)}</title>
<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:90em}table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
td:nth-child(-n+5),th:nth-child(-n+5){text-align:left}figure{margin:1em 0}.bad{color:#b91c1c}</style></head>
<body><h1>${esc(meta.title)}</h1>
<p>${esc(meta.guest)}. Every cell migrated the same guest from the same seed; all times are guest (simulated) time.</p>
${failed.length ? `<ul class="bad">${failed.map((r) => `<li>${esc(label(r))}: ${esc(r.error ?? "not verified")}</li>`).join("")}</ul>` : ""}
<table><thead><tr>${cells.head.map((h) => `<th>${esc(h)}</th>`).join("")}</tr></thead><tbody>
${cells.rows.map((row) => `<tr>${row.map((c) => `<td>${esc(c)}</td>`).join("")}</tr>`).join("\n")}
</tbody></table>
${lines("Remaining bytes at each sync", "MiB", ranked, (p) => p.remainingBytes / MiB, { log: true, ref })}
${lines("Dirty rate at each sync", "pages/s", ranked, (p) => p.dirtyRatePagesPerSecond)}
${bars("Downtime", "ms", ranked, (r) => round(1)(r.downtimeMs ?? 0))}
${bars("Total time", "s", ranked, (r) => round(2)(r.totalTimeMs / 1e3))}
${bars("Guest slowdown while tracked", "%", ranked, (r) => round(2)(100 * r.guestSlowdown))}
${bars("vCPU time lost to tracking", "ms", ranked, (r) => round(1)(r.vcpuTimeLostMs))}
${bars("Host time in syncs", "ms", ranked, (r) => round(2)(r.syncHostMs))}
${bars("Bytes sent", "MiB", ranked, (r) => round(0)(r.transferredBytes / MiB))}
${bars("Syncs", "count", ranked, (r) => r.dirtySyncCount)}
${bars("Ring-full exits + PML-full exits + HDBSS-full faults", "count", ranked, (r) => r.ringFullExits + r.pmlFullExits + r.hdbssFullFaults)}
<p>Generated by <code>migration-controller compare</code>, ranked by ${esc(meta.by)} (verified cells first; ties by total time).</p>
</body></html>
`;
}
