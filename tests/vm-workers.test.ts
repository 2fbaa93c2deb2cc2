/**
 * The service with its VMs in worker threads must behave as with them on the
 * gRPC thread: every gRPC-level test of the hypervisor, the device and the
 * controller's migrations runs again with HYPERVISOR_VM_WORKERS=2 (the
 * harness and every spawned hypervisor read it). Tests that read the model
 * in process cannot run so and are not listed.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { describe, test } from "node:test";

const ROOT = new URL("../", import.meta.url).pathname;

const FILES = [
  "services/hypervisor/test/arch.test.ts",
  "services/hypervisor/test/concurrent-sync.test.ts",
  "services/hypervisor/test/contention.test.ts",
  "services/hypervisor/test/cpu-throttle.test.ts",
  "services/hypervisor/test/dirty-limit.test.ts",
  "services/hypervisor/test/dirty-rate.test.ts",
  "services/hypervisor/test/dirty-ring.test.ts",
  "services/hypervisor/test/errors.test.ts",
  "services/hypervisor/test/hw-dbm.test.ts",
  "services/hypervisor/test/mmu.test.ts",
  "services/hypervisor/test/phased-workload.test.ts",
  "services/hypervisor/test/pml.test.ts",
  "services/hypervisor/test/postcopy.test.ts",
  "services/hypervisor/test/selftest.test.ts",
  "services/hypervisor/test/zipf.test.ts",
  "services/page-tracking-device/test/integration.test.ts",
  "services/page-tracking-device/test/registration.test.ts",
  "clients/migration-controller/test/migrate.test.ts",
  "clients/migration-controller/test/postcopy.test.ts",
  "clients/migration-controller/test/hardening.test.ts",
  "clients/migration-controller/test/round-cost.test.ts",
  "clients/migration-controller/test/downtime.test.ts",
  "tests/invariant-matrix.test.ts",
];

function runWithWorkers(file: string): Promise<{ code: number | null; output: string }> {
  // Not a child of this runner: a nested `node --test` that sees NODE_TEST_CONTEXT reports to it instead of exiting with its result.
  const { NODE_TEST_CONTEXT: _, ...env } = process.env;
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, ["--import", "tsx", "--test", file], { cwd: ROOT, env: { ...env, HYPERVISOR_VM_WORKERS: "2", LOG_LEVEL: "silent" }, stdio: ["ignore", "pipe", "pipe"] });
    let output = "";
    p.stdout.on("data", (d) => (output += d));
    p.stderr.on("data", (d) => (output += d));
    p.once("error", reject);
    p.once("close", (code) => resolve({ code, output }));
  });
}

describe("with the VMs in two worker threads (HYPERVISOR_VM_WORKERS=2), the gRPC-level tests pass as they do on the gRPC thread", () => {
  for (const file of FILES) {
    test(file, async () => {
      const { code, output } = await runWithWorkers(file);
      const failures = output.split("\n").filter((l) => /^\s*not ok |^\s+error: /.test(l)).slice(0, 20).join("\n");
      assert.equal(code, 0, `${file} failed with the VMs in worker threads:\n${failures}`);
      assert.match(output, /^# pass [1-9]/m, "its tests ran");
      assert.match(output, /^# fail 0$/m);
    });
  }
});
