/**
 * A KubeVirt MigrationPolicy as input: parsed strictly (every bad field
 * named), applied as KubeVirt applies it, and changing a migration's outcome
 * as KubeVirt would: without it a busy guest is aborted at the completion
 * timeout; with allowPostCopy it switches to post-copy then (not before) and
 * completes; with allowWorkloadDisruption alone the guest is paused to
 * complete.
 */
import assert from "node:assert/strict";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { WorkloadPattern } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { GiB, hypervisorPair, MiB } from "../../../tests/hypervisor-harness.js";
import { EXIT, runCli } from "../cli.js";
import { DEFAULT_CONFIG, migrate, type MigrationError } from "../migrate.js";
import { applyMigrationPolicy, parseMigrationPolicy, parseQuantity } from "../policies/kubevirt-policy.js";

const doc = (spec: string) => `apiVersion: migrations.kubevirt.io/v1alpha1
kind: MigrationPolicy
metadata:
  name: test-policy
spec:
${spec}`;

describe("a KubeVirt MigrationPolicy file", () => {
  test("parsed strictly: unknown fields, bad values, another kind or version, bad YAML are errors naming the file and the field", () => {
    const p = parseMigrationPolicy(doc("  allowAutoConverge: true\n  allowPostCopy: true\n  bandwidthPerMigration: 64Mi\n  completionTimeoutPerGiB: 800\n  selectors:\n    namespaceSelector:\n      team: a\n"), "p.yaml");
    assert.deepEqual(p, { name: "test-policy", allowAutoConverge: true, allowPostCopy: true, bandwidthPerMigration: 64 * MiB, completionTimeoutPerGiB: 800 });
    const bad = (text: string, re: RegExp) => assert.throws(() => parseMigrationPolicy(text, "p.yaml"), re);
    bad(doc("  maxDowntimeMs: 300\n"), /p\.yaml: spec\.maxDowntimeMs: unknown field/);
    bad(doc("  allowPostCopy: yes please\n"), /p\.yaml: spec\.allowPostCopy must be true or false/);
    bad(doc("  bandwidthPerMigration: fast\n"), /spec\.bandwidthPerMigration: "fast" is not a Kubernetes quantity/);
    bad(doc("  bandwidthPerMigration: -1Mi\n"), /spec\.bandwidthPerMigration must not be negative/);
    bad(doc("  completionTimeoutPerGiB: -5\n"), /spec\.completionTimeoutPerGiB must be a whole number of seconds > 0/);
    bad(doc("  selectors:\n    podSelector: {}\n"), /spec\.selectors\.podSelector: unknown field/);
    bad(doc("  allowAutoConverge: true\n").replace("v1alpha1", "v1"), /apiVersion must be migrations\.kubevirt\.io\/v1alpha1/);
    bad(doc("  allowAutoConverge: true\n").replace("kind: MigrationPolicy", "kind: KubeVirt"), /kind must be MigrationPolicy/);
    bad("spec: [unclosed\n", /p\.yaml: not valid YAML/);
    assert.equal(parseQuantity("1G", "q"), 1e9);
    assert.equal(parseQuantity("1e3", "q"), 1000);
    assert.equal(parseQuantity("500", "q"), 500);
  });

  test("applied as KubeVirt does: allowWorkloadDisruption follows allowPostCopy; bandwidth caps the link; 0 is unlimited", () => {
    const cfg = { ...DEFAULT_CONFIG, bandwidthBitsPerSecond: 1e9 };
    const with_ = (spec: string) => applyMigrationPolicy(cfg, parseMigrationPolicy(doc(spec), "p.yaml"));
    let c = with_("  allowPostCopy: true\n");
    assert.equal(c.completionTimeoutAction, "postcopy");
    assert.equal(c.postcopy?.afterRounds, "completion-timeout");
    c = with_("  allowPostCopy: true\n  allowWorkloadDisruption: false\n");
    assert.deepEqual([c.completionTimeoutAction, c.postcopy], ["abort", null], "post-copy needs the disruption it is");
    c = with_("  allowWorkloadDisruption: true\n");
    assert.deepEqual([c.completionTimeoutAction, c.postcopy], ["pause", null]);
    c = with_("  allowAutoConverge: true\n  bandwidthPerMigration: 64Mi\n  completionTimeoutPerGiB: 20\n");
    assert.equal(c.autoConverge?.cpuThrottleInitial, 20);
    assert.equal(c.bandwidthBitsPerSecond, 64 * MiB * 8);
    assert.equal(c.completionTimeoutPerGiBS, 20);
    assert.equal(with_("  bandwidthPerMigration: 10Gi\n").bandwidthBitsPerSecond, 1e9, "never more than the link");
    assert.equal(with_("  bandwidthPerMigration: 0Mi\n").bandwidthBitsPerSecond, 1e9, "0: unlimited");
  });

  describe("in a migration", () => {
    const pair = hypervisorPair();
    before(() => pair.start());
    after(() => pair.stop());

    /** 64 MiB written once, then rewritten uniformly by 2 vCPUs: over 1 Gbit/s it never converges. */
    const busyVm = async (vm: string) => {
      const c = pair.src.client;
      await c.createVm({ vm, vcpus: 2, seed: 5n, memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(64 * MiB) }] });
      await c.setWorkload({ vm, workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: 1e7 } });
      await c.advanceVm({ vm, durationNs: 1_000_000_000n });
      await c.setWorkload({ vm, workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, writesPerSecond: 20_000, readsPerSecond: 20_000 } });
    };
    // completionTimeoutPerGiB 48: 3 s of guest time for 64 MiB.
    const base = { ...DEFAULT_CONFIG, bandwidthBitsPerSecond: 1e9, latencyNs: 1_000_000, downtimeLimitMs: 30 };
    const run = (vm: string, spec: string) => migrate({ ...applyMigrationPolicy(base, parseMigrationPolicy(doc(spec), "p.yaml")), sourceVm: vm, destinationVm: vm }, { source: pair.src.client, destination: pair.dst.client });

    test("no post-copy allowed: aborted at the completion timeout", async () => {
      await busyVm("kv-abort");
      await assert.rejects(run("kv-abort", "  completionTimeoutPerGiB: 48\n"), (e: MigrationError) => e.kind === "not-converged" && /completion timeout of 48 s per GiB/.test(e.message));
    });

    test("allowPostCopy: pre-copy until the completion timeout, then post-copy, completed and verified", async () => {
      await busyVm("kv-postcopy");
      const r = await run("kv-postcopy", "  completionTimeoutPerGiB: 48\n  allowPostCopy: true\n");
      assert.equal(r.status, "completed");
      assert.equal(r.verification?.match, true);
      assert.equal(r.switchover?.postcopy, true);
      const switchAt = r.rounds.filter((x) => !x.postcopy).reduce((t, x) => t + x.durationMs, r.setupTimeMs);
      assert.ok(switchAt >= 3000, `post-copy began at ${switchAt.toFixed(0)} ms, not before the 3 s completion timeout`);
      assert.ok(r.postcopy!.requests > 0);
    });

    test("allowWorkloadDisruption alone: the guest is paused at the completion timeout and the migration completes by stop-and-copy", async () => {
      await busyVm("kv-pause");
      const r = await run("kv-pause", "  completionTimeoutPerGiB: 48\n  allowWorkloadDisruption: true\n");
      assert.equal(r.status, "completed");
      assert.equal(r.verification?.match, true);
      assert.deepEqual([r.switchover?.postcopy, r.switchover?.forced], [false, true]);
      assert.ok(r.downtimeMs! > 100, `a long stop-and-copy: ${r.downtimeMs} ms`);
    });

    test("the CLI: --policy FILE applies it; a bad file is exit 2 naming the field; a flag that says the same is a conflict", async () => {
      const dir = mkdtempSync(join(tmpdir(), "policy-"));
      const file = (name: string, text: string) => {
        writeFileSync(join(dir, name), text);
        return join(dir, name);
      };
      const cli = async (...args: string[]) => {
        let err = "";
        const code = await runCli(["migrate", "--source", pair.src.address, "--destination", pair.dst.address, "--quiet", ...args], { out: { write: () => true }, err: { write: (s: string) => (err += s) }, env: {} });
        return { code, err };
      };
      let r = await cli("--vm", "none", "--policy", file("bad.yaml", doc("  maxDowntimeMs: 300\n")));
      assert.equal(r.code, EXIT.usage);
      assert.match(r.err, /bad\.yaml: spec\.maxDowntimeMs: unknown field/);
      r = await cli("--vm", "none", "--policy", join(dir, "missing.yaml"));
      assert.equal(r.code, EXIT.usage);
      assert.match(r.err, /--policy .*missing\.yaml: cannot read it/);
      r = await cli("--vm", "none", "--auto-converge", "--policy", file("ac.yaml", doc("  allowAutoConverge: false\n")));
      assert.equal(r.code, EXIT.usage);
      assert.match(r.err, /--auto-converge conflicts with spec\.allowAutoConverge/);
      await busyVm("kv-cli");
      r = await cli("--vm", "kv-cli", "--bandwidth", "1Gbit", "--latency", "1", "--downtime-limit", "30", "--policy", file("pc.yaml", doc("  completionTimeoutPerGiB: 48\n  allowPostCopy: true\n")));
      assert.equal(r.code, EXIT.ok, r.err);
    });
  });
});
