/**
 * Go users generate from the protos with no flags: protoc-gen-go and
 * protoc-gen-go-grpc (Debian's) take the import paths from go_package, the
 * generated packages and clients/go/dirtylogcheck build offline against
 * Debian's Go gRPC in GOPATH mode, and the client runs collections against
 * a real hypervisor server.
 */
import assert from "node:assert/strict";
import { execFile, execFileSync } from "node:child_process";
import { cpSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { missingCommands, needTools } from "../../../tests/host-tools.js";
import { startHypervisor } from "../../../tests/hypervisor-harness.js";

const ROOT = new URL("../../../", import.meta.url).pathname;
const PROTOS = ["dirtytrack/hypervisor/v1/hypervisor.proto", "dirtytrack/ptdevice/v1/ptdevice.proto", "dirtytrack/controller/v1/controller.proto"];

test("Go code generated from the protos with no flags builds, and a Go client's collections hold the dirty-log invariant", { timeout: 300_000 }, async (t) => {
  const missing = missingCommands(["go", "protoc", "protoc-gen-go", "protoc-gen-go-grpc"]);
  if (!needTools(t, missing, "apt-get install -y golang-go protoc-gen-go protoc-gen-go-grpc golang-google-grpc-dev golang-github-golang-protobuf-1-5-dev")) return;
  const gopath = mkdtempSync(join(tmpdir(), "go-client-"));
  const h = await startHypervisor();
  try {
    const src = join(gopath, "src");
    mkdirSync(src);
    execFileSync("protoc", ["-I", join(ROOT, "proto"), `--go_out=${src}`, `--go-grpc_out=${src}`, ...PROTOS]);
    cpSync(join(ROOT, "clients/go/dirtylogcheck"), join(src, "dirtytrack/dirtylogcheck"), { recursive: true });
    // GOPATH mode, offline: Debian's Go packages live in /usr/share/gocode.
    const env = { ...process.env, GOPATH: `${gopath}:/usr/share/gocode`, GO111MODULE: "off", GOFLAGS: "", GOPROXY: "off", GOCACHE: join(gopath, "cache") };
    const run = (args: string[], cwd: string) =>
      new Promise<{ code: number; stdout: string; stderr: string }>((resolve) =>
        execFile(args[0]!, args.slice(1), { cwd, env, timeout: 240_000 }, (err, stdout, stderr) => resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr })),
      );
    // Every generated package lands where go_package says, and builds.
    const built = await run(["go", "build", "./..."], join(src, "dirtytrack/gen/go"));
    assert.equal(built.code, 0, built.stderr);
    const vet = await run(["go", "vet", "."], join(src, "dirtytrack/dirtylogcheck"));
    assert.equal(vet.code, 0, vet.stderr);
    // Asynchronously: the hypervisor under test serves from this process's event loop.
    const r = await run(["go", "run", ".", "-rounds", "4", h.address], join(src, "dirtytrack/dirtylogcheck"));
    assert.equal(r.code, 0, r.stderr);
    assert.equal((r.stdout.match(/^collection \d+: (\d+) dirty pages, exactly the \1 written$/gm) ?? []).length, 4, r.stdout);
    assert.match(r.stdout, /invariant held/);
    assert.equal((await h.client.listVms({})).vms.length, 0, "the client removed its VM");
  } finally {
    await h.close();
    rmSync(gopath, { recursive: true, force: true });
  }
});
