/**
 * The HTML reports render in a real browser: headless Chromium (Debian's
 * package) loads the migration report and the comparison page, builds their
 * DOM with every chart, and takes a screenshot that is not blank.
 */
import assert from "node:assert/strict";
import { execFileSync, spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { Capability, WorkloadPattern } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { needTools } from "../../../tests/host-tools.js";
import { GiB, hypervisorPair, MiB } from "../../../tests/hypervisor-harness.js";
import { migrate } from "../migrate.js";
import { QEMU_AUTO_CONVERGE } from "../policies/auto-converge.js";
import { htmlReport } from "../report.js";
import { cli } from "./cli-harness.js";

const chromium = ["chromium", "chromium-browser"].find((c) => spawnSync("sh", ["-c", `command -v ${c}`]).status === 0);
const BROWSER = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"];

/** The page's DOM once Chromium has loaded it, and a screenshot of it: its PNG size and dimensions. */
function render(file: string, dir: string): { dom: string; png: { bytes: number; width: number; height: number } } {
  const dom = execFileSync(chromium!, [...BROWSER, "--dump-dom", `file://${file}`], { encoding: "utf8", stdio: ["ignore", "pipe", "ignore"], timeout: 60_000 });
  const shot = join(dir, "shot.png");
  execFileSync(chromium!, [...BROWSER, `--screenshot=${shot}`, "--window-size=1200,1600", `file://${file}`], { stdio: "ignore", timeout: 60_000 });
  const png = readFileSync(shot);
  assert.equal(png.subarray(1, 4).toString(), "PNG", "a PNG");
  return { dom, png: { bytes: png.length, width: png.readUInt32BE(16), height: png.readUInt32BE(20) } };
}

describe("the HTML reports in headless Chromium", () => {
  const pair = hypervisorPair();
  let dir: string;
  before(async () => {
    if (!chromium) return;
    dir = mkdtempSync(join(tmpdir(), "render-"));
    await pair.start();
  });
  after(async () => {
    if (!chromium) return;
    await pair.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  const need = (t: { skip(m: string): void }) => {
    return needTools(t, chromium ? [] : ["chromium"], "apt-get install -y chromium (Debian's package)");
  };

  test("a migration's report: every chart drawn as SVG, the threshold and the link rate as reference lines, a page that is not blank", async (t) => {
    if (!need(t)) return;
    await pair.src.client.createVm({
      vm: "r",
      vcpus: 2,
      seed: 2n,
      memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(128 * MiB) }],
      dirtyRing: { capability: Capability.CAPABILITY_DIRTY_LOG_RING_ACQ_REL, bytes: 16384n, withBitmap: true },
      workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, writesPerSecond: 60_000, workingSetPages: 16384n },
    });
    await pair.src.client.advanceVm({ vm: "r", durationNs: 200_000_000n });
    const r = await migrate({ sourceVm: "r", destinationVm: "r", mechanism: "ring", bandwidthBitsPerSecond: 1e9, autoConverge: QEMU_AUTO_CONVERGE }, { source: pair.src.client, destination: pair.dst.client });
    const file = join(dir, "report.html");
    writeFileSync(file, htmlReport(r, { logScale: true }));
    const { dom, png } = render(file, dir);
    for (const chart of ["Remaining (dirty) at each sync (MiB)", "Dirty rate at each sync (MiB/s)", "Guest writes in each round (writes/s)", "Exits in each round (count)", "vCPU throttle in each round (auto-converge) (%)"]) {
      assert.ok(dom.includes(`aria-label="${chart}"`), `the chart '${chart}' is in the DOM`);
    }
    assert.match(dom, /switchover threshold = bandwidth x downtime limit/);
    assert.match(dom, /link rate \(119\.2 MiB\/s\)/);
    assert.deepEqual([png.width, png.height], [1200, 1600]);
    assert.ok(png.bytes > 40_000, `a page with charts, not a blank one (${png.bytes} bytes of PNG)`);
  });

  test("a comparison's page: the table, the line charts and a bar chart per figure", async (t) => {
    if (!need(t)) return;
    const file = join(dir, "compare.html");
    const r = await cli(["compare", "--memory", "32MiB", "--vcpus", "2", "--arch", "arm64", "--mechanism", "bitmap,ring", "--quiet", "--report", file]);
    assert.equal(r.code, 0, r.err);
    const { dom, png } = render(file, dir);
    assert.ok((dom.match(/<svg/g) ?? []).length >= 10);
    assert.match(dom, /<td>arm64<\/td><td>ring<\/td>/);
    assert.ok(png.bytes > 40_000, `${png.bytes} bytes of PNG`);
  });
});
