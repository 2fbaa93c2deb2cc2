import assert from "node:assert/strict";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { DEFAULT_COSTS } from "../../../services/hypervisor/model/cost-model.js";
import { EXIT } from "../cli.js";
import { DEFAULT_CONFIG } from "../migrate.js";
import { predict } from "../predict/model.js";
import { parseMechanism } from "../trackers/index.js";
import { cli, noStack } from "./cli-harness.js";

interface Checked {
  converges: boolean;
  "dirty-sync-count": number;
  downtime: number | null;
  "total-time": number;
  check: { converged: boolean; "dirty-sync-count": number; downtime: number | null; "total-time": number };
}

describe("predict", () => {
  let dir: string;
  before(async () => (dir = await mkdtemp(join(tmpdir(), "predict-"))));
  after(() => rm(dir, { recursive: true, force: true }));

  async function checked(args: string[]): Promise<Checked> {
    const json = join(dir, "p.json");
    const r = await cli(["predict", "--check", "--json", json, ...args]);
    assert.equal(r.code, EXIT.ok, `${args.join(" ")}: ${r.out}${r.err}`);
    assert.match(r.out, /^predicted: /m);
    assert.match(r.out, /^simulated: /m);
    assert.match(r.out, /^error: converge matches/m);
    return JSON.parse(await readFile(json, "utf8"));
  }

  // The README's bounds for a converging migration: syncs within 1, downtime and total time within 15%.
  const within = (p: number, a: number, share: number, what: string) => assert.ok(Math.abs(p - a) <= share * a, `${what}: predicted ${p}, simulated ${a}`);

  test("--check on converging workloads: the rounds, total time and downtime are within the README's bounds", async () => {
    for (const args of [
      ["--memory", "512MiB", "--vcpus", "2", "--dirty-rate", "60", "--bandwidth", "2Gbit"],
      ["--memory", "512MiB", "--vcpus", "2", "--dirty-rate", "120", "--bandwidth", "2Gbit", "--mechanism", "ring"],
      ["--memory", "512MiB", "--vcpus", "2", "--working-set", "64MiB", "--dirty-rate", "400", "--bandwidth", "2Gbit", "--mechanism", "bitmap+manual"],
      ["--memory", "512MiB", "--vcpus", "2", "--dirty-rate", "200", "--bandwidth", "2Gbit", "--auto-converge"],
    ]) {
      const j = await checked(args);
      assert.equal(j.converges, true, args.join(" "));
      assert.ok(Math.abs(j["dirty-sync-count"] - j.check["dirty-sync-count"]) <= 1, `${args.join(" ")}: syncs ${j["dirty-sync-count"]} against ${j.check["dirty-sync-count"]}`);
      within(j.downtime!, j.check.downtime!, 0.15, `${args.join(" ")}: downtime`);
      within(j["total-time"], j.check["total-time"], 0.15, `${args.join(" ")}: total time`);
    }
  });

  test("--check on a workload that dirties faster than the link carries: both say it does not converge", async () => {
    const j = await checked(["--memory", "128MiB", "--vcpus", "2", "--dirty-rate", "200", "--bandwidth", "1Gbit", "--completion-timeout-per-gib", "40"]);
    assert.equal(j.converges, false);
    assert.equal(j.check.converged, false);
  });

  test("the model: faster dirtying, a slower link or a costlier mechanism never predicts a shorter migration", () => {
    const base = { memoryBytes: 2 ** 31, workingSetBytes: 2 ** 31, dirtyPagesPerSecond: 50_000, vcpus: 4, mechanism: parseMechanism("bitmap"), ringEntries: 4096, config: DEFAULT_CONFIG, costs: DEFAULT_COSTS };
    const t = (o: Partial<typeof base>) => predict({ ...base, ...o }).totalTimeMs;
    assert.ok(t({ dirtyPagesPerSecond: 100_000 }) > t({}));
    assert.ok(t({ config: { ...DEFAULT_CONFIG, bandwidthBitsPerSecond: 5e9 } }) > t({}));
    assert.ok(t({ costs: { ...DEFAULT_COSTS, writeFaultNs: 0 } }) > t({}), "a dearer fault slows the guest: fewer pages dirty, a shorter migration");
    const idle = predict({ ...base, dirtyPagesPerSecond: 0 });
    assert.equal(idle.dirtySyncCount, 2, "nothing dirty: round 0, then the switchover's sync");
  });

  test("the rate from estimate --json is the initial rate over the working set; bad input exits 2 with the reason", async () => {
    const est = join(dir, "est.json");
    await writeFile(est, JSON.stringify({ "dirty-rate": 100, "calc-time": 1000 }));
    const r = await cli(["predict", "--from-estimate", est, "--memory", "1GiB", "--working-set", "256MiB"]);
    assert.equal(r.code, EXIT.ok, r.err);
    // 100 MiB seen in 1 s of a 256 MiB set: an initial rate of -256 ln(1 - 100/256) = 126.8 MiB/s.
    assert.match(r.out, /dirty rate 126\.8 MiB\/s untracked \(from .*est\.json: 100 MiB\/s over 1000 ms\)/);
    const bad = join(dir, "bad.json");
    await writeFile(bad, JSON.stringify({ rate: 1 }));
    for (const [args, message] of [
      [[], /give the dirty rate: --dirty-rate MIBPS, --from-estimate FILE, or --source ADDR --vm NAME/],
      [["--dirty-rate", "5", "--from-estimate", est], /--dirty-rate and --from-estimate: give one source/],
      [["--dirty-rate=-5"], /--dirty-rate -5: must be MiB\/s/],
      [["--dirty-rate", "5", "--memory", "1GiB", "--working-set", "2GiB"], /--working-set 2GiB: must be between 4 KiB and --memory/],
      [["--from-estimate", bad], /not the JSON of estimate --json/],
      [["--from-estimate", join(dir, "none.json")], /--from-estimate .*none\.json: ENOENT/],
      [["--vm", "x", "--check"], /--check migrates a guest built from the numbers/],
      [["--dirty-rate", "5", "--mechanism", "bitmap+frob"], /unknown part 'frob'/],
    ] as [string[], RegExp][]) {
      const e = await cli(["predict", ...args]);
      assert.equal(e.code, EXIT.usage, `${args.join(" ")}: ${e.err}`);
      assert.match(e.err, message);
      noStack(e.err);
    }
  });
});
