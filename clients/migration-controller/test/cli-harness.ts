/** Runs the migration controller's CLI in process with its output captured. */
import assert from "node:assert/strict";
import { runCli } from "../cli.js";

export async function cli(args: string[], env: Record<string, string> = {}) {
  let out = "";
  let err = "";
  const code = await runCli(args, { out: { write: (s: string) => (out += s) }, err: { write: (s: string) => (err += s) }, env });
  return { code, out, err };
}

export const noStack = (s: string) => assert.doesNotMatch(s, /\n\s+at .+:\d+:\d+/, "no stack trace");
