/**
 * A bad environment is one line naming the variable and exit code 1, for
 * every component, never a stack trace: a port above 65535, a port in use,
 * an unknown LOG_LEVEL. An empty bind address means 127.0.0.1.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createServer, type Server } from "node:net";
import { availableParallelism } from "node:os";
import { after, before, describe, test } from "node:test";
import { spawnService } from "../common/spawn.js";

const ROOT = new URL("../", import.meta.url).pathname;

/** Runs a component's main with env and returns its exit code and stderr (bounded wait). */
function run(entry: string, env: Record<string, string>, args: string[] = []): Promise<{ code: number | null; err: string; out: string }> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, ["--import", "tsx", entry, ...args], { cwd: ROOT, env: { ...process.env, LOG_LEVEL: "warn", ...env }, stdio: ["ignore", "pipe", "pipe"] });
    let err = "";
    let out = "";
    p.stderr.on("data", (b) => (err += b));
    p.stdout.on("data", (b) => (out += b));
    const timer = setTimeout(() => {
      p.kill("SIGKILL");
      reject(new Error(`${entry} did not exit within 20 s: ${err}`));
    }, 20_000);
    p.on("exit", (code) => {
      clearTimeout(timer);
      resolve({ code, err, out });
    });
  });
}

const COMPONENTS = [
  { name: "hypervisor", entry: "services/hypervisor/main.ts", args: [], grpc: "HYPERVISOR_GRPC_PORT", http: "HYPERVISOR_HTTP_PORT" },
  { name: "page-tracking-device", entry: "services/page-tracking-device/main.ts", args: [], grpc: "PTDEVICE_GRPC_PORT", http: "PTDEVICE_HTTP_PORT" },
  {
    name: "migration-controller",
    entry: "clients/migration-controller/main.ts",
    args: ["serve", "--hypervisor-a", "127.0.0.1:1", "--hypervisor-b", "127.0.0.1:2"],
    grpc: "MIGRATION_GRPC_PORT",
    http: "MIGRATION_HTTP_PORT",
  },
] as const;

const oneLine = (err: string, re: RegExp) => {
  const lines = err.trim().split("\n");
  assert.equal(lines.length, 1, `one line:\n${err}`);
  assert.match(lines[0], re);
  assert.doesNotMatch(err, /\n\s+at |Error:/, "no stack trace");
};

describe("a bad environment: one line naming the variable, exit 1", () => {
  let busy: Server;
  let busyPort: number;
  before(async () => {
    busy = createServer();
    await new Promise<void>((r) => busy.listen(0, "127.0.0.1", r));
    busyPort = (busy.address() as { port: number }).port;
  });
  after(() => new Promise<void>((r) => busy.close(() => r())));

  for (const c of COMPONENTS) {
    const ports = { [c.grpc]: "0", [c.http]: "0" };
    test(`${c.name}: a port above 65535, a port in use, an unknown LOG_LEVEL`, async () => {
      const port = c.grpc;
      let r = await run(c.entry, { ...ports, [port]: "70000" }, [...c.args]);
      assert.equal(r.code, 1);
      oneLine(r.err, new RegExp(`^${c.name}: ${port}=70000 is not a port \\(an integer in \\[0, 65535\\]`));

      r = await run(c.entry, { ...ports, [c.http]: String(busyPort) }, [...c.args]);
      assert.equal(r.code, 1);
      oneLine(r.err, new RegExp(`^${c.name}: ${c.http}=${busyPort}: cannot listen on 127\\.0\\.0\\.1:${busyPort} .*the address is in use$`));

      r = await run(c.entry, { ...ports, LOG_LEVEL: "loud" }, [...c.args]);
      assert.equal(r.code, 1);
      oneLine(r.err, /LOG_LEVEL=loud is not a level \(one of fatal, error, warn, info, debug, trace, silent\)/);
    });
  }

  test("hypervisor: a gRPC port in use names its variable too", async () => {
    const r = await run("services/hypervisor/main.ts", { HYPERVISOR_GRPC_PORT: String(busyPort), HYPERVISOR_HTTP_PORT: "0" });
    assert.equal(r.code, 1);
    oneLine(r.err, new RegExp(`^hypervisor: HYPERVISOR_GRPC_PORT=${busyPort}: cannot listen on 127\\.0\\.0\\.1:${busyPort} for gRPC: the address is in use$`));
  });

  test("hypervisor: HYPERVISOR_VM_WORKERS is a count in [0, 64] or auto", async () => {
    for (const bad of ["many", "65", "-1", "1.5"]) {
      const r = await run("services/hypervisor/main.ts", { HYPERVISOR_GRPC_PORT: "0", HYPERVISOR_HTTP_PORT: "0", HYPERVISOR_VM_WORKERS: bad });
      assert.equal(r.code, 1);
      oneLine(r.err, new RegExp(`^hypervisor: HYPERVISOR_VM_WORKERS=${bad.replace(".", "\\.")}: not a count of worker threads in \\[0, 64\\] or "auto"$`));
    }
    const hv = await spawnService("services/hypervisor/main.ts", { HYPERVISOR_GRPC_PORT: "0", HYPERVISOR_HTTP_PORT: "0", HYPERVISOR_ANNOUNCE: "1", HYPERVISOR_VM_WORKERS: "auto" });
    try {
      const health = (await (await fetch(`http://127.0.0.1:${hv.httpPort}/healthz`)).json()) as { detail: { workers: number } };
      assert.equal(health.detail.workers, availableParallelism(), "auto: one worker per CPU");
    } finally {
      assert.equal(await hv.stop(), 0);
    }
  });

  test("an empty MIGRATION_HOST binds 127.0.0.1, as every component does", async () => {
    const p = spawn(process.execPath, ["--import", "tsx", "clients/migration-controller/main.ts", "serve", "--hypervisor-a", "127.0.0.1:1", "--hypervisor-b", "127.0.0.1:2"], {
      cwd: ROOT,
      env: { ...process.env, LOG_LEVEL: "silent", MIGRATION_HOST: "", MIGRATION_HTTP_PORT: "0", MIGRATION_GRPC_PORT: "0", MIGRATION_ANNOUNCE: "1" },
      stdio: ["ignore", "pipe", "pipe"],
    });
    try {
      const line = await new Promise<string>((resolve, reject) => {
        let out = "";
        p.stdout.on("data", (b) => {
          out += b;
          if (out.includes("\n")) resolve(out.split("\n")[0]);
        });
        p.on("exit", () => reject(new Error("serve exited")));
      });
      const { listening } = JSON.parse(line) as { listening: { host: string; httpPort: number } };
      assert.equal(listening.host, "127.0.0.1");
      assert.equal((await fetch(`http://127.0.0.1:${listening.httpPort}/healthz`)).status, 200);
    } finally {
      p.kill("SIGTERM");
    }
  });
});
