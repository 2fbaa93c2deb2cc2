/**
 * The README's examples run as shown: every demo command it gives (inline
 * or in a block, `npm start -- …` or `npm run demo -- …`), and each row of
 * its one-workload-every-policy table, with the outcome the text states
 * (exit 0, or exit 4 where it says the migration does not converge).
 */
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { EXIT, runCli } from "../clients/migration-controller/cli.js";

const README = readFileSync(new URL("../README.md", import.meta.url), "utf8");
/**
 * Examples that run for minutes and need gigabytes (the 1 TiB guest): a doc check instead, that
 * the benchmark's scale section measures that size (its figures are the README's).
 */
const HEAVY = /--memory 1TiB/;

const scratch = mkdtempSync(join(tmpdir(), "readme-"));

/** A MigrationPolicy file with these spec fields ("allowPostCopy: true"). */
function policyFile(fields: string[]): string {
  const file = join(scratch, `policy-${fields.join("-").replace(/[^a-z0-9]+/gi, "_")}.yaml`);
  writeFileSync(file, `apiVersion: migrations.kubevirt.io/v1alpha1\nkind: MigrationPolicy\nmetadata:\n  name: readme\nspec:\n${fields.map((f) => `  ${f}\n`).join("")}`);
  return file;
}

interface Example {
  /** As the README gives it. */
  label: string;
  command: string;
  exit: number;
}

/** `npm start -- …` and `npm run demo -- …` in inline code (which may wrap lines); "(exit N)" right after it sets the outcome. */
function demoExamples(): Example[] {
  const out: Example[] = [];
  for (const m of README.matchAll(/`(npm (?:start|run demo)(?: --[^`]*)?)`([^`\n]*)/g)) {
    const command = m[1].replace(/\s+/g, " ").trim();
    // --help prints; the policy table's base command runs with each row's flags below.
    if (command.includes("--help") || m[2].startsWith(" plus the flags")) continue;
    out.push({ label: command, command, exit: /\(exit (\d)\)/.exec(m[2])?.[1] ? Number(/\(exit (\d)\)/.exec(m[2])![1]) : 0 });
  }
  // The one-workload table: its base command "plus the flags" of each row.
  const table = /One workload, every policy \(`([^`]+)` plus the flags[\s\S]*?\n\n((?:[ \t]*\|.*\n)+)/.exec(README);
  assert.ok(table, "the README's policy table");
  const base = table[1].replace(/\s+/g, " ");
  for (const row of table[2].split("\n").filter((l) => /^\s*\| (none|`)/.test(l))) {
    const cells = row.split("|").map((c) => c.trim());
    // "`--policy` with `field: value`, …": a KubeVirt MigrationPolicy of those fields.
    const policy = /^`--policy` with (.+)$/.exec(cells[1]);
    const flags = cells[1] === "none" ? "" : policy ? `--policy ${policyFile([...policy[1].matchAll(/`([^`]+)`/g)].map((x) => x[1]))}` : cells[1].replace(/`/g, "");
    out.push({ label: `${base} plus ${cells[1]}`, command: `${base} ${flags}`.trim(), exit: /exit (\d)/.exec(cells[2])?.[1] ? Number(/exit (\d)/.exec(cells[2])![1]) : cells[2] === "completed" ? 0 : -1 });
  }
  return out.filter((e, i, all) => all.findIndex((x) => x.command === e.command) === i);
}

describe("the README's examples", () => {
  const dir = scratch;
  after(() => rmSync(dir, { recursive: true, force: true }));
  const examples = demoExamples();

  test("there are examples to run, and each states an outcome", () => {
    assert.ok(examples.length >= 6, examples.map((e) => e.command).join("\n"));
    for (const e of examples) assert.notEqual(e.exit, -1, `an outcome for ${e.command}`);
  });

  for (const e of examples) {
    if (HEAVY.test(e.command)) {
      test(`${e.label}: measured by npm run bench -- --only scale`, () => {
        const bench = readFileSync(new URL("../scripts/bench.ts", import.meta.url), "utf8");
        assert.match(bench, /"scale-gib": \{ type: "string", default: "[\d,]*1024"/, "the scale section's default sizes reach 1 TiB");
        assert.match(README, /`npm run bench -- --only scale`\s+measures 4 GiB to 1 TiB/);
      });
      continue;
    }
    test(`${e.label} exits ${e.exit}`, { timeout: 600_000 }, async () => {
      const args = e.command.replace(/^npm (start|run demo)( --)?/, "").trim().split(" ").filter(Boolean);
      // Output files go to a scratch directory.
      const files = args.map((a, i) => (["--report", "--json"].includes(args[i - 1]) ? join(dir, a) : a));
      let err = "";
      const code = await runCli(["demo", ...files, "--quiet"], { out: { write: () => true }, err: { write: (s: string) => (err += s) }, env: {} });
      assert.equal(code, e.exit, `${e.command}: ${err}`);
      if (e.exit === EXIT.ok) assert.doesNotMatch(err, /failed/);
    });
  }
});
