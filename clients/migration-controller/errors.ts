/** How a migration fails: the kind decides the CLI's exit code. */
import type { MigrationReport } from "./types.js";

export type FailureKind = "usage" | "unreachable" | "not-found" | "precondition" | "not-converged" | "verification" | "interrupted" | "failed" | "postcopy-lost";

export class MigrationError extends Error {
  override name = "MigrationError";
  constructor(
    readonly kind: FailureKind,
    message: string,
    readonly report?: MigrationReport,
  ) {
    super(message);
  }
}
