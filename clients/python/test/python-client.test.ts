/**
 * Another language calls the RPCs: Python stubs generated from the buf module
 * with Debian's protoc and grpc_python_plugin (into a scratch directory, so
 * they are never stale), and clients/python/dirty_log_check.py run under
 * /usr/bin/python3 against a real hypervisor server.
 */
import assert from "node:assert/strict";
import { execFile, execFileSync, spawnSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { missingCommands, needTools } from "../../../tests/host-tools.js";
import { startHypervisor } from "../../../tests/hypervisor-harness.js";

const ROOT = new URL("../../../", import.meta.url).pathname;

test("a Python client generated from the protos runs collections against a hypervisor and the dirty-log invariant holds", { timeout: 120_000 }, async (t) => {
  const grpcio = spawnSync("/usr/bin/python3", ["-c", "import grpc, google.protobuf"], { stdio: "ignore" }).status === 0;
  const missing = [...missingCommands(["protoc", "grpc_python_plugin"]), ...(grpcio ? [] : ["python3-grpcio"])];
  if (!needTools(t, missing, "apt-get install -y protobuf-compiler protobuf-compiler-grpc python3-grpcio python3-protobuf")) return;
  const out = mkdtempSync(join(tmpdir(), "py-stubs-"));
  const h = await startHypervisor();
  try {
    execFileSync("protoc", ["-I", join(ROOT, "proto"), `--python_out=${out}`, `--grpc_python_out=${out}`, "--plugin=protoc-gen-grpc_python=/usr/bin/grpc_python_plugin", "dirtytrack/hypervisor/v1/hypervisor.proto"]);
    // Asynchronously: the hypervisor under test serves from this process's event loop.
    const r = await new Promise<{ status: number | null; stdout: string; stderr: string }>((resolve) => {
      execFile("/usr/bin/python3", [join(ROOT, "clients/python/dirty_log_check.py"), h.address, "--rounds", "4"], { env: { ...process.env, PYTHONPATH: out }, timeout: 60_000 }, (err, stdout, stderr) =>
        resolve({ status: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr }),
      );
    });
    assert.equal(r.status, 0, r.stderr);
    assert.equal((r.stdout.match(/^collection \d+: (\d+) dirty pages, exactly the \1 written$/gm) ?? []).length, 4, r.stdout);
    assert.match(r.stdout, /invariant held/);
    assert.equal((await h.client.listVms({})).vms.length, 0, "the script removed its VM");
  } finally {
    await h.close();
    rmSync(out, { recursive: true, force: true });
  }
});
