/**
 * The API's compatibility promise: the protos stay wire- and source-compatible
 * (buf's FILE rules) with the last release, whose image is committed in
 * proto/releases/ (`buf build --exclude-source-info -o proto/releases/vX.Y.Z.binpb` at release).
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { cpSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import semver from "semver";

const ROOT = new URL("../", import.meta.url).pathname;
const BUF = join(ROOT, "node_modules/.bin/buf");
const releases = readdirSync(join(ROOT, "proto/releases")).filter((f) => /^v\d+\.\d+\.\d+\.binpb$/.test(f));
const LAST = join(ROOT, "proto/releases", releases.sort((a, b) => semver.compare(a.slice(1, -6), b.slice(1, -6))).at(-1)!);

const breaking = (moduleDir: string) =>
  new Promise<{ code: number; out: string }>((resolve) =>
    execFile(BUF, ["breaking", moduleDir, "--against", LAST], { encoding: "utf8" }, (err, stdout, stderr) => resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, out: stdout + stderr })),
  );

test("the protos are compatible with the last release (buf breaking, FILE rules)", async () => {
  const pkg = JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8")) as { version: string };
  assert.ok(semver.lte(LAST.replace(/^.*\/v(.*)\.binpb$/, "$1"), pkg.version), `the last release image ${LAST} is not newer than package.json's ${pkg.version}`);
  const r = await breaking(join(ROOT, "proto"));
  assert.equal(r.code, 0, r.out);
});

test("buf breaking catches a deleted field, a renumbered field and a changed go_package", async () => {
  const dir = mkdtempSync(join(tmpdir(), "proto-compat-"));
  try {
    const file = join(dir, "dirtytrack/hypervisor/v1/hypervisor.proto");
    const original = readFileSync(join(ROOT, "proto/dirtytrack/hypervisor/v1/hypervisor.proto"), "utf8");
    const cases: [string, string, RegExp][] = [
      ["  uint64 memory_size = 3;\n", "", /Previously present field "3" with name "memory_size" on message "Memslot" was deleted/],
      ["  uint64 memory_size = 3;\n", "  uint64 memory_size = 9;\n", /field "3" with name "memory_size" on message "Memslot" was deleted/],
      ['option go_package = "dirtytrack/gen/go/dirtytrack/hypervisor/v1;hypervisorv1";', 'option go_package = "example.com/other;hypervisorv1";', /go_package/],
    ];
    for (const [from, to, expected] of cases) {
      cpSync(join(ROOT, "proto/dirtytrack"), join(dir, "dirtytrack"), { recursive: true });
      cpSync(join(ROOT, "proto/buf.yaml"), join(dir, "buf.yaml"));
      assert.equal(original.split(from).length, 2, `the case's text occurs once: ${from}`);
      writeFileSync(file, original.replace(from, to));
      const r = await breaking(dir);
      assert.notEqual(r.code, 0, `buf breaking accepted: ${from.trim()} -> ${to.trim() || "(deleted)"}`);
      assert.match(r.out, expected);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
