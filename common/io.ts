/** Where a command line writes, and the environment it reads: process's own, or a test's. */
export interface Io {
  out: { write(s: string): unknown; isTTY?: boolean; columns?: number };
  err: { write(s: string): unknown; isTTY?: boolean };
  env: Record<string, string | undefined>;
}
