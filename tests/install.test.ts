/**
 * `npm ci` on any platform, without warnings: the lockfile holds every
 * optional (per-platform) package its packages ask for, it matches
 * package.json, and every locked package supports the Node.js versions the
 * project declares.
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import semver from "semver";

const ROOT = new URL("../", import.meta.url);
const pkg = JSON.parse(readFileSync(new URL("package.json", ROOT), "utf8"));
const lock = JSON.parse(readFileSync(new URL("package-lock.json", ROOT), "utf8")) as {
  packages: Record<string, { version?: string; optionalDependencies?: Record<string, string>; engines?: { node?: string }; dev?: boolean }>;
};

/** Where npm resolves a dependency of the package at path: its own node_modules, then each parent's. */
function resolveIn(path: string, name: string): string | undefined {
  for (let dir = path; ; ) {
    const at = `${dir ? `${dir}/` : ""}node_modules/${name}`;
    if (lock.packages[at]) return at;
    if (!dir) return undefined;
    const i = dir.lastIndexOf("/node_modules/");
    dir = i < 0 ? "" : dir.slice(0, i);
  }
}

test("every optional package a locked package names is in the lockfile, at a version its range accepts", () => {
  const missing: string[] = [];
  for (const [path, p] of Object.entries(lock.packages)) {
    for (const [name, range] of Object.entries(p.optionalDependencies ?? {})) {
      const at = resolveIn(path, name);
      if (!at || !semver.satisfies(lock.packages[at].version!, range)) missing.push(`${path || "(root)"} -> ${name}@${range}`);
    }
  }
  assert.deepEqual(missing, []);
});

test("the lockfile's root is package.json's dependencies", () => {
  const root = lock.packages[""] as unknown as { dependencies: object; devDependencies: object; engines: object };
  assert.deepEqual(root.dependencies, pkg.dependencies);
  assert.deepEqual(root.devDependencies, pkg.devDependencies);
  assert.deepEqual(root.engines, pkg.engines);
});

test("every locked package supports every Node.js version the project declares (no EBADENGINE)", () => {
  const declared = semver.minVersion(pkg.engines.node)!.version;
  assert.ok(semver.satisfies(process.version, pkg.engines.node), `this Node.js ${process.version} is one the project declares (${pkg.engines.node})`);
  const refusing = Object.entries(lock.packages)
    .filter(([, p]) => p.engines?.node && !semver.satisfies(declared, p.engines.node))
    .map(([path, p]) => `${path}@${p.version} wants node ${p.engines!.node}`);
  assert.deepEqual(refusing, [], `packages that do not support node ${declared}, the oldest the project declares`);
});
