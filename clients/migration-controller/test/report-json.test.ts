/**
 * --json as a tool reads it: QEMU's names with QEMU's types (whole numbers
 * where query-migrate has integers), kebab-case keys throughout, the unit of
 * every numeric field, and the row of the sync that ended a failed migration.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { Capability, WorkloadPattern } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { GiB, hypervisorPair, MiB } from "../../../tests/hypervisor-harness.js";
import { migrate, type MigrationError, type MigrationReport } from "../migrate.js";
import { QEMU_AUTO_CONVERGE } from "../policies/auto-converge.js";
import { JSON_UNITS, jsonReport, textReport } from "../report.js";

/** Every numeric leaf's path (arrays as []) and every key, outside "units". */
function walk(v: unknown, path: string, numbers: Set<string>, keys: Set<string>): void {
  if (typeof v === "number") numbers.add(path);
  else if (Array.isArray(v)) v.forEach((x) => walk(x, `${path}[]`, numbers, keys));
  else if (v && typeof v === "object") {
    for (const [k, x] of Object.entries(v)) {
      if (path === "" && k === "units") continue;
      keys.add(k);
      walk(x, path ? `${path}.${k}` : k, numbers, keys);
    }
  }
}

const INTEGERS = ["total-time", "setup-time", "downtime", "expected-downtime", "cpu-throttle-percentage", "ram.transferred", "ram.remaining", "ram.dirty-pages-rate", "ram.dirty-sync-count", "ram.normal", "ram.duplicate"];

describe("the JSON report", () => {
  const pair = hypervisorPair();
  before(() => pair.start());
  after(() => pair.stop());

  async function guest(vm: string, ring: boolean, rate: number) {
    await pair.src.client.createVm({
      vm,
      vcpus: 2,
      seed: 4n,
      memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(64 * MiB) }],
      dirtyRing: ring ? { capability: Capability.CAPABILITY_DIRTY_LOG_RING_ACQ_REL, bytes: 65536n, withBitmap: true } : undefined,
      workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, writesPerSecond: rate },
    });
    await pair.src.client.advanceVm({ vm, durationNs: 200_000_000n });
  }

  function check(r: MigrationReport) {
    const j = jsonReport(r) as Record<string, unknown> & { ram: Record<string, number>; units: Record<string, string> };
    const numbers = new Set<string>();
    const keys = new Set<string>();
    walk(j, "", numbers, keys);
    for (const k of keys) assert.match(k, /^[a-z0-9]+(-[a-z0-9]+)*$/, `key '${k}' is kebab-case`);
    for (const p of numbers) assert.ok(p in JSON_UNITS || (p.startsWith("tracker.") && "tracker.*" in JSON_UNITS), `a unit for ${p}`);
    const at = (p: string) => p.split(".").reduce((o: unknown, k) => (o as Record<string, unknown>)?.[k], j);
    for (const p of INTEGERS) {
      const v = at(p);
      assert.ok(v === null || Number.isInteger(v), `${p} is an integer, as query-migrate's: ${v}`);
    }
    assert.equal((j["x-exact"] as Record<string, number>)["total-time"], r.totalTimeMs, "the exact value beside the rounded one");
    return j as unknown as Record<string, unknown> & { rounds: Record<string, unknown>[] };
  }

  test("a completed ring migration with auto-converge: integers where QEMU has them, kebab-case keys, a unit for every number", async () => {
    await guest("ok", true, 30_000);
    const r = await migrate({ sourceVm: "ok", destinationVm: "ok", mechanism: "ring", bandwidthBitsPerSecond: 1e9, autoConverge: QEMU_AUTO_CONVERGE }, { source: pair.src.client, destination: pair.dst.client });
    const j = check(r);
    assert.ok(j.rounds.some((x) => Array.isArray(x["vcpu-dirty-rate"])), "the ring's per-vCPU rates are there");
    assert.ok(j.rounds.every((x) => x["ended-migration"] === false));
  });

  test("a migration that fails during a pass keeps that round as far as it got, and counts the bytes it sent", async () => {
    await guest("fail", false, 400_000);
    // 64 MiB over 100 Mbit/s: round 0 alone needs 5.4 s; the completion timeout (40 s per GiB) ends it at 2.5 s.
    const err = await migrate({ sourceVm: "fail", destinationVm: "fail", bandwidthBitsPerSecond: 100e6, completionTimeoutPerGiBS: 40, chunkPages: 1024 }, { source: pair.src.client, destination: pair.dst.client }).then(
      () => assert.fail("it should time out"),
      (e: MigrationError) => e,
    );
    assert.equal(err.kind, "not-converged");
    const report = err.report!;
    const j = check(report);
    assert.equal(j.rounds.length, 1);
    const last = j.rounds[0];
    assert.equal(last["ended-migration"], true);
    assert.equal(last["dirty-pages"], 16384, "the figures of the sync that opened it (round 0: every page)");
    const sent = last["pages-sent"] as number;
    assert.ok(sent > 0 && sent < 16384, `part of the pass went: ${sent} pages`);
    assert.equal((j.ram as Record<string, number>).transferred, last.transferred, "ram.transferred counts the failed pass's bytes");
    assert.match(textReport(report), /^x the round during which the migration ended/m);
  });
});
