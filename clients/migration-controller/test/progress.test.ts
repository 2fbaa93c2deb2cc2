import assert from "node:assert/strict";
import { test } from "node:test";
import { runCli } from "../cli.js";
import { liveLines, progressPrinter } from "../progress.js";
import type { ProgressEvent } from "../types.js";

// eslint-style stripping of the CSI sequences log-update writes.
const strip = (s: string) => s.replace(/\x1b\[[0-9;?]*[A-Za-z]/g, "");

const event = (e: Partial<ProgressEvent>): ProgressEvent => ({
  phase: "round",
  round: 0,
  dirtyPages: 0,
  remainingBytes: 0,
  dirtyRatePagesPerSecond: 0,
  expectedDowntimeMs: 0,
  elapsedMs: 0,
  transferredBytes: 0,
  cpuThrottlePercentage: 0,
  dirtyLimitMBps: 0,
  ...e,
});

test("the live display: a bar that moves chunk by chunk, the last sync with its estimated completion, lines cut to the terminal", () => {
  const sync = event({ round: 3, remainingBytes: 300 * 2 ** 20, dirtyRatePagesPerSecond: 123456, expectedDowntimeMs: 238, etaMs: 1200, cpuThrottlePercentage: 30 });
  const half = liveLines(sync, event({ phase: "send", round: 3, passBytes: 300 * 2 ** 20, passSentBytes: 150 * 2 ** 20, elapsedMs: 4210 }), 80);
  assert.equal(half.length, 2);
  assert.match(half[0], /^round 3 \[#{10}-{10}\]  50% 150 MiB of 300 MiB  t=4\.21s$/);
  assert.match(half[1], /^sync 3: 300 MiB left, 123,456 pages\/s, downtime ~238 ms, done in ~1\.2 s/);
  for (const l of half) assert.ok(l.length <= 79, `${l.length} columns: ${l}`);
  assert.ok(half[1].endsWith("…"), "the throttle does not fit 80 columns: cut, not wrapped");
  assert.ok(liveLines(sync, event({ phase: "send", round: 3, passBytes: 300 * 2 ** 20, passSentBytes: 150 * 2 ** 20 }), 200)[1].includes("vCPUs throttled 30%"));
  const notConverging = liveLines({ ...sync, etaMs: null }, event({ phase: "send", round: 3 }), 200);
  assert.match(notConverging[1], /not converging at this rate/);
});

test("on a terminal a migration redraws during rounds and fits 80 columns; off one it prints one line per sync", async () => {
  const run = async (tty: boolean) => {
    let err = "";
    const writes: string[] = [];
    const errStream = { isTTY: tty, columns: 80, write: (s: string) => (writes.push(s), (err += s)) };
    const code = await runCli(["demo", "--memory", "256MiB", "--vcpus", "2", "--chunk-pages", "8192", "--bandwidth", "2Gbit"], { out: { write: () => true }, err: errStream, env: {} });
    assert.equal(code, 0, err);
    return { err: strip(err), writes };
  };
  const live = await run(true);
  const sends = live.writes.filter((w) => /round \d+ \[/.test(strip(w)));
  assert.ok(sends.length >= 8, `redrawn chunk by chunk: ${sends.length} redraws of the bar`);
  const display = live.err.split("\n").filter((l) => /^(round \d+ \[|sync \d+: )/.test(l));
  assert.ok(display.length > 0);
  for (const l of display) assert.ok(l.length <= 80, `the display fits 80 columns: ${l}`);
  assert.match(live.err, /done in ~[\d.]+ s|not converging/);
  const plain = await run(false);
  assert.doesNotMatch(plain.err, /\x1b|\[#+/, "no escape codes and no bar");
  assert.match(plain.err, /^t=[\d.]+s sync 1: [\d,]+ dirty pages/m);
});

test("quiet prints nothing", () => {
  let out = "";
  const p = progressPrinter({ isTTY: true, columns: 80, write: (s: string) => (out += s) }, true);
  p.onProgress(event({ phase: "send", passBytes: 1, passSentBytes: 1 }));
  p.end();
  assert.equal(out, "");
});
