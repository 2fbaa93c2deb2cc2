/**
 * Charts for the HTML reports: ECharts rendered to SVG on the server, so a
 * page needs no script and no network. Lines over guest time (one series
 * each, an optional dashed reference line beside them, never over bars),
 * and bars by category.
 */
import { createRequire } from "node:module";
import type * as Echarts from "echarts";

// Loaded on the first chart: half a second of start-up every command would pay otherwise.
let loaded: typeof Echarts | null = null;
const echarts = () => (loaded ??= createRequire(import.meta.url)("echarts") as typeof Echarts);

export const esc = (s: string) => s.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]!);

function svg(title: string, option: Echarts.EChartsCoreOption, width: number, height: number): string {
  const chart = echarts().init(null, null, { renderer: "svg", ssr: true, width, height });
  chart.setOption({ animation: false, textStyle: { fontFamily: "system-ui, sans-serif" }, title: { text: title, left: 10, textStyle: { fontSize: 14 } }, ...option });
  const out = chart.renderToSVGString();
  chart.dispose();
  // The title as the figure's accessible name, as the earlier hand-drawn charts had it.
  return `<figure>${out.replace("<svg ", `<svg aria-label="${esc(title)}" role="img" `)}</figure>`;
}

/** x rounded up to a half of its power of ten (1311 -> 1500), so that the axis ends on a readable value. */
function roundUp(x: number): number {
  if (!(x > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(x));
  return (Math.ceil((2 * x) / p) / 2) * p;
}

export interface LineSeries {
  name: string;
  /** [x, y] points: x in the x axis's unit. */
  points: [number, number][];
}

export interface Reference {
  value: number;
  name: string;
}

/** Lines over a value x axis; the legend beside the plot, one series a line; references as dashed red lines with their label inside the plot. */
export function lineChart(o: { title: string; xName: string; yName: string; series: LineSeries[]; log?: boolean; refs?: Reference[]; step?: boolean }): string {
  const height = Math.max(340, 80 + 18 * (o.series.length + (o.refs?.length ?? 0)));
  const floor = o.log ? Math.min(...o.series.flatMap((s) => s.points.map((p) => p[1])).filter((y) => y > 0), ...(o.refs ?? []).map((r) => r.value)) / 2 : 0;
  const series: object[] = o.series.map((s) => ({
    name: s.name,
    type: "line",
    symbolSize: 5,
    step: o.step ? "end" : undefined,
    data: s.points.map(([x, y]) => [x, o.log ? Math.max(y, floor) : y]),
  }));
  for (const r of o.refs ?? []) {
    series.push({ name: r.name, type: "line", symbolSize: 0, data: [], markLine: { symbol: "none", lineStyle: { type: "dashed", color: "#dc2626", width: 1.5 }, label: { formatter: r.name, position: "insideEndTop", color: "#dc2626" }, data: [{ yAxis: r.value }] } });
  }
  // References are labelled in the plot; a legend only tells several series apart.
  const legend = o.series.length > 1;
  const refMax = Math.max(0, ...(o.refs ?? []).map((r) => r.value));
  return svg(
    o.title,
    {
      grid: { left: 80, right: legend ? 400 : 40, top: 56, bottom: 50 },
      legend: legend ? { orient: "vertical", right: 10, top: 50, itemWidth: 18, itemGap: 4, textStyle: { fontSize: 11 } } : undefined,
      xAxis: { type: "value", name: o.xName, nameLocation: "middle", nameGap: 26 },
      // The axis reaches the references, so that a link rate far above the data still shows.
      yAxis: { type: o.log ? "log" : "value", name: o.yName, nameLocation: "end", nameTextStyle: { align: "left" }, max: o.log ? undefined : (v: { max: number }) => roundUp(Math.max(v.max, refMax * 1.1)) },
      series,
    },
    1100,
    height,
  );
}

/** Bars by category (several series side by side), horizontal when there are many categories, with each value printed. */
export function barChart(o: { title: string; unit: string; categories: string[]; values?: number[]; colors?: string[]; series?: { name: string; values: number[] }[]; horizontal?: boolean }): string {
  const list = o.series ?? [{ name: o.unit, values: o.values ?? [] }];
  const series = list.map((s) => ({ name: s.name, type: "bar", data: s.values.map((value, i) => ({ value, itemStyle: o.colors ? { color: o.colors[i] } : undefined })), label: { show: true, position: o.horizontal ? "right" : "top", fontSize: 10 } }));
  const value = { type: "value", name: o.unit };
  const category = { type: "category", data: o.categories, inverse: o.horizontal, axisLabel: { fontSize: 11 } };
  return svg(
    o.title,
    {
      grid: o.horizontal ? { left: 320, right: 60, top: 36, bottom: 30 } : { left: 80, right: 40, top: 56, bottom: 50 },
      legend: o.series ? { top: 24, right: 20 } : undefined,
      xAxis: o.horizontal ? value : category,
      yAxis: o.horizontal ? category : { ...value, nameLocation: "end" },
      series,
    },
    o.horizontal ? 900 : 1100,
    o.horizontal ? 70 + 20 * o.categories.length : 300,
  );
}
