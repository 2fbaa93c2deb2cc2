import assert from "node:assert/strict";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { startHypervisor } from "../../../tests/hypervisor-harness.js";
import { EXIT } from "../cli.js";
import { cli, noStack } from "./cli-harness.js";

const SMALL = ["--memory", "32MiB", "--vcpus", "2", "--write-rate", "50000", "--quiet"];

interface CellJson {
  rank: number;
  arch: string;
  mechanism: string;
  policy: string;
  status: string;
  error?: string;
  verified: boolean;
  downtime: number;
  "total-time": number;
  series: unknown[];
}

describe("compare", () => {
  let dir: string;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "compare-"));
  });
  after(() => rm(dir, { recursive: true, force: true }));

  test("six cells on one guest: every cell verifies, the table is ranked by its figures, the JSON and HTML carry every cell, the same seed gives the same table", async () => {
    const args = ["compare", ...SMALL, "--arch", "arm64", "--mechanism", "bitmap,ring,dbm", "--policies", "none,auto-converge", "--jobs", "2", "--seed", "7"];
    const json = join(dir, "c.json");
    const html = join(dir, "c.html");
    const first = await cli([...args, "--json", json, "--report", html]);
    assert.equal(first.code, EXIT.ok, first.err);
    const cells = (JSON.parse(await readFile(json, "utf8")) as { cells: CellJson[] }).cells;
    assert.equal(cells.length, 6);
    assert.deepEqual(
      cells.map((c) => `${c.mechanism} ${c.policy}`).sort(),
      ["bitmap auto-converge", "bitmap none", "bitmap+dbm auto-converge", "bitmap+dbm none", "ring auto-converge", "ring none"],
    );
    for (const c of cells) {
      assert.equal(c.status, "completed", c.error);
      assert.equal(c.verified, true);
      assert.ok(c.series.length >= 2, "a point per sync");
    }
    // Ranked by downtime, ties by total time.
    for (let i = 1; i < cells.length; i++) {
      const [a, b] = [cells[i - 1], cells[i]];
      assert.ok(a.downtime < b.downtime || (a.downtime === b.downtime && a["total-time"] <= b["total-time"]), `rank ${a.rank} before ${b.rank}`);
    }
    // The printed table is in the same order.
    const rows = first.out.split("\n").filter((l) => /^\s*\d+\s+arm64/.test(l));
    assert.deepEqual(rows.map((l) => l.trim().split(/\s+/)[2]), cells.map((c) => c.mechanism));
    const page = await readFile(html, "utf8");
    assert.match(page, /^<!doctype html>/);
    for (const c of cells) assert.ok(page.includes(`${c.arch} ${c.mechanism} ${c.policy} `), `the page names ${c.mechanism} ${c.policy}`);
    assert.ok((page.match(/<svg/g) ?? []).length >= 10, "two line charts and a bar chart per figure");
    assert.doesNotMatch(page, /<script/, "self-contained: charts are SVG");

    const again = await cli(args);
    assert.equal(again.code, EXIT.ok);
    assert.equal(again.out, first.out, "the same inputs give the same table");
  });

  test("cells run on running hypervisors given with --hypervisors, and a KubeVirt MigrationPolicy file is a policy of the axis", async () => {
    const [a, b] = [await startHypervisor(), await startHypervisor()];
    try {
      const file = join(dir, "slow.yaml");
      await writeFile(file, "apiVersion: migrations.kubevirt.io/v1alpha1\nkind: MigrationPolicy\nmetadata:\n  name: slow\nspec:\n  bandwidthPerMigration: 64Mi\n");
      const json = join(dir, "remote.json");
      const r = await cli(["compare", ...SMALL, "--arch", "arm64", "--mechanism", "bitmap,ring", "--policies", `none,${file}`, "--hypervisors", `${a.address},${b.address}`, "--json", json]);
      assert.equal(r.code, EXIT.ok, r.err);
      const cells = (JSON.parse(await readFile(json, "utf8")) as { cells: (CellJson & { bandwidth: number })[] }).cells;
      assert.equal(cells.length, 4);
      assert.ok(cells.every((c) => c.verified));
      // bandwidthPerMigration caps the link at 64 MiB/s: those cells take longer.
      const slow = cells.filter((c) => c.policy === file);
      assert.ok(slow.every((c) => c.bandwidth === 64 * 2 ** 20 * 8), `the policy's cap: ${slow.map((c) => c.bandwidth)}`);
      assert.ok(Math.min(...slow.map((c) => c["total-time"])) > Math.max(...cells.filter((c) => c.policy === "none").map((c) => c["total-time"])));
      for (const h of [a, b]) assert.equal((await h.client.listVms({})).vms.length, 0, "every cell's VMs removed");
    } finally {
      await Promise.all([a.close(), b.close()]);
    }
  });

  test("--shard K/N runs the cells whose index is K modulo N", async () => {
    const json = join(dir, "shard.json");
    const r = await cli(["compare", ...SMALL, "--arch", "arm64", "--mechanism", "bitmap,ring,dbm", "--shard", "1/2", "--jobs", "1", "--json", json]);
    assert.equal(r.code, EXIT.ok, r.err);
    const cells = (JSON.parse(await readFile(json, "utf8")) as { cells: (CellJson & { cell: number })[] }).cells;
    assert.deepEqual(cells.map((c) => [c.cell, c.mechanism]), [[1, "ring"]]);
  });

  test("a failed cell shows in the table with its reason and the others still run (exit 1)", async () => {
    const r = await cli(["compare", ...SMALL, "--mechanism", "bitmap,ring", "--arch", "x86_64", "--policies", "dirty-limit", "--jobs", "1"]);
    assert.equal(r.code, EXIT.failed, r.err);
    const rows = r.out.split("\n");
    assert.match(rows.find((l) => / ring /.test(l) && /x86_64/.test(l))!, /yes$/, "the ring cell migrated under dirty-limit");
    assert.match(rows.find((l) => / bitmap /.test(l))!, /no$/);
    assert.match(r.out, /#2 failed: .*ring/i, "the reason: dirty-limit needs the ring");
    noStack(r.err);
  });

  test("a matrix that cannot run is refused before anything starts, with the reason (exit 2)", async () => {
    const cases: [string[], RegExp][] = [
      [["--mechanism", ""], /--mechanism '': an empty entry/],
      [["--mechanism", "bitmap,,ring"], /an empty entry/],
      [["--mechanism", "ring,ring"], /'ring' is given twice/],
      [["--mechanism", "bitmap+frob"], /unknown part 'frob'/],
      [["--arch", "x86_64", "--mechanism", "dbm"], /bitmap\+dbm is arm64's; --arch x86_64 lacks it/],
      [["--arch", "sparc"], /--arch 'sparc': must be arm64 or x86_64/],
      [["--policies", "none,turbo"], /--policy turbo: cannot read it/],
      [["--bandwidth", "10Gbit,fast"], /--bandwidth: /],
      [["--jobs", "0"], /--jobs 0: must be a whole number in \[1, 64\]/],
      [["--memory", "1TiB", "--jobs", "64"], /needs about .* of hypervisor memory .* over the .* each of 64 hypervisors/],
      [["--auto-converge"], /compare takes its policies as one axis/],
      [["--cpu-throttle-initial", "30"], /--cpu-throttle-initial needs auto-converge in --policies/],
      [["--rank-by", "luck"], /--rank-by luck: must be one of downtime/],
      [["--shard", "4/4"], /--shard 4\/4: must be K\/N with 0 <= K < N/],
      [["--shard", "5/9", "--mechanism", "ring"], /--shard 5\/9: no cell of the 2 falls in it/],
    ];
    for (const [extra, message] of cases) {
      const r = await cli(["compare", "--quiet", ...extra]);
      assert.equal(r.code, EXIT.usage, `${extra.join(" ")}: ${r.err}`);
      assert.match(r.err, message, extra.join(" "));
      noStack(r.err);
    }
  });
});
