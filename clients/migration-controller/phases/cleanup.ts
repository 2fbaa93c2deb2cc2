/**
 * The end of a migration. After success the source's logging, throttle and
 * dirty limit are turned off (QEMU's migration_cleanup), and a step that fails is
 * reported, not undone: the guest runs on the destination now. After a
 * failure or an interruption everything the migration changed is undone,
 * each step with a deadline and whatever the others did, and both sides are
 * looked at again so that the report says what was observed.
 */
import { status as GrpcStatus } from "@grpc/grpc-js";
import type { MigrationRun } from "../run.js";
import type { CleanupReport } from "../types.js";

const why = (err: unknown) => (err as { details?: string }).details ?? (err as Error).message;

/** The guest runs on the destination: nothing may remove it or resume the source any more. */
export async function complete(run: MigrationRun): Promise<void> {
  const { did, report, cfg, source } = run;
  did.paused = false;
  did.destinationCreated = false;
  report.status = "completed";
  const problems: string[] = [];
  try {
    await run.tracker.stop();
    did.trackerStarted = false;
  } catch (err) {
    problems.push(`turning logging off on the source: ${why(err)}`);
  }
  if (did.throttled) {
    try {
      await source.setCpuThrottle({ vm: cfg.sourceVm, percentage: 0 });
      did.throttled = false;
    } catch (err) {
      problems.push(`stopping the source's throttle: ${why(err)}`);
    }
  }
  if (did.dirtyLimited) {
    try {
      await source.setVcpuDirtyLimit({ vm: cfg.sourceVm, dirtyRateMbps: 0n });
      did.dirtyLimited = false;
    } catch (err) {
      problems.push(`cancelling the source's dirty limit: ${why(err)}`);
    }
  }
  if (problems.length > 0) {
    const slowed = did.throttled || did.dirtyLimited;
    report.cleanup = { sourceRunning: false, sourceLogging: did.trackerStarted ? null : false, sourceThrottled: slowed ? true : null, destinationRemoved: false, problems };
  }
}

/** Undoes what a failed migration changed, then looks at both sides again. */
export async function cleanUp(run: MigrationRun): Promise<CleanupReport> {
  const { did, cfg, source, destination } = run;
  const problems: string[] = [];
  const attempt = async (what: string, fn: () => Promise<unknown>) => {
    try {
      await fn();
    } catch (err) {
      problems.push(`${what}: ${why(err)}`);
    }
  };
  if (did.throttled) await attempt("stopping the source's throttle", () => source.setCpuThrottle({ vm: cfg.sourceVm, percentage: 0 }));
  if (did.dirtyLimited) await attempt("cancelling the source's dirty limit", () => source.setVcpuDirtyLimit({ vm: cfg.sourceVm, dirtyRateMbps: 0n }));
  if (did.paused) await attempt("resuming the source", () => source.resumeVm({ vm: cfg.sourceVm }));
  if (did.trackerStarted) await attempt("turning logging off on the source", () => run.tracker.stop());
  if (did.destinationCreated) await attempt("removing the destination VM", () => destination.destroyVm({ vm: cfg.destinationVm }));
  const out: CleanupReport = { sourceRunning: null, sourceLogging: null, sourceThrottled: null, destinationRemoved: null, problems };
  await attempt("looking at the source", async () => {
    const v = (await source.getVm({ vm: cfg.sourceVm })).vm!;
    out.sourceRunning = v.vcpus.some((c) => !c.paused);
    out.sourceLogging = v.memslots.some((m) => m.logging) || v.hardwareDirty || v.pageTrackingDevice;
    out.sourceThrottled = v.vcpus.some((c) => c.cpuThrottlePercentage > 0 || c.dirtyLimitMbps > 0n);
  });
  if (did.destinationCreated) {
    try {
      await destination.getVm({ vm: cfg.destinationVm });
      out.destinationRemoved = false;
    } catch (err) {
      if ((err as { code?: number }).code === GrpcStatus.NOT_FOUND) out.destinationRemoved = true;
      else problems.push(`looking at the destination: ${why(err)}`);
    }
  }
  return out;
}
