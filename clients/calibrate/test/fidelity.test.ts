/**
 * The fidelity report's held-back rows from the committed measurements of a
 * host of this machine kind: every quantity predicted and compared, the
 * never-stopping guest losing nothing. (The figures themselves are in
 * `npm run fidelity`, not asserted here.)
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import { heldBack, runFidelity } from "../fidelity.js";

const fixture = new URL("../../../services/hypervisor/test/fixtures/kvm-harness-256mib.json", import.meta.url);

test("held-back figures: each one the fit did not use, predicted by the model fitted to the same measurements", async () => {
  const { rows } = await heldBack(JSON.parse(readFileSync(fixture, "utf8")), "fixture");
  const names = rows.map((r) => r.quantity);
  for (const q of [/one dirty page in each 512/, /one page in 64 ever mapped/, /THP backing, after a logging pass over one page in 8/, /entries 65 pages apart/, /4096-entry ring/, /never-stopping guest/])
    assert.ok(names.some((n) => q.test(n)), `${q} is compared`);
  for (const r of rows) {
    assert.ok(r.model > 0 && Number.isFinite(r.ratio), `${r.quantity}: model ${r.model}, ratio ${r.ratio}`);
    assert.equal(typeof r.met, "boolean", r.quantity);
  }
  assert.match(rows.find((r) => /never-stopping/.test(r.quantity))!.note!, /, 0 lost;/);
});

test("fidelity's command line: help, and a bad option refused", async () => {
  const out: string[] = [];
  const err: string[] = [];
  const io = { out: { write: (s: string) => out.push(s) }, err: { write: (s: string) => err.push(s) }, env: {} };
  assert.equal(await runFidelity(["--help"], io), 0);
  assert.match(out.join(""), /--measurements FILE/);
  assert.equal(await runFidelity(["--frobnicate"], io), 2);
  assert.match(err.join(""), /Unknown option '--frobnicate'/);
});
