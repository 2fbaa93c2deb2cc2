/**
 * Verify: the destination's memory at its resume must equal the source's at
 * its stop, bit for bit. The source stays paused from its stop, so its
 * memory now is its memory then; the destination's is the snapshot its
 * resume took. Both are hashed at once, after the downtime.
 */
import { MigrationError } from "../errors.js";
import type { MigrationRun } from "../run.js";

export async function verify(run: MigrationRun): Promise<void> {
  const { cfg, source, destination, bulk, report } = run;
  run.progress("verify");
  const [a, b] = await Promise.all([
    run.on("source", () => source.getMemoryDigest({ vm: cfg.sourceVm }, bulk)),
    run.on("destination", () => destination.getMemoryDigest({ vm: cfg.destinationVm, atResume: true }, bulk)),
  ]);
  report.verification = { sourceSha256: a.sha256Hex, destinationSha256: b.sha256Hex, match: a.sha256Hex === b.sha256Hex };
  if (!report.verification.match) {
    throw new MigrationError(
      "verification",
      `verification failed: the destination's memory at its resume (sha256 ${b.sha256Hex.slice(0, 16)}…) differs from the source's at its stop (${a.sha256Hex.slice(0, 16)}…): dirty pages were lost`,
    );
  }
}
