/**
 * Host tools the tests drive (Prometheus, Docker, Go, protoc, Chromium, kubectl).
 * `.ci/run` installs them, so under CI a missing one fails its test; elsewhere
 * the test skips and says what to install.
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";

export const hasCommand = (bin: string) => spawnSync("sh", ["-c", `command -v ${bin}`]).status === 0;

/** The commands of bins that are not on PATH. */
export const missingCommands = (bins: readonly string[]) => bins.filter((b) => !hasCommand(b));

/** True when nothing is missing; otherwise fails under CI, or skips the test saying how to get what is missing. */
export function needTools(t: { skip(message: string): void }, missing: readonly string[], install: string): boolean {
  if (missing.length === 0) return true;
  const why = `missing ${missing.join(", ")}: ${install}`;
  if (process.env.CI) assert.fail(`${why} (.ci/run installs it; CI runs every test)`);
  t.skip(why);
  return false;
}
