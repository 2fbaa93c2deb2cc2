/**
 * Setup: the source is looked at and checked, the destination created with
 * its layout (paused, not logging), then dirty logging is turned on
 * (QEMU's ram_save_setup: memory_global_dirty_log_start).
 */
import type { HypervisorClient } from "../../../services/hypervisor/client.js";
import type { VmInfo } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { MigrationError } from "../errors.js";
import { callSide, MigrationRun } from "../run.js";
import type { Endpoints, MigrationConfig } from "../types.js";

/** Creates the destination with the source's layout, paused, logging off. */
async function createDestination(dst: HypervisorClient, name: string, src: VmInfo): Promise<void> {
  await dst.createVm({
    vm: name,
    vcpus: src.vcpus.length,
    memslots: src.memslots.map((s) => ({ ...s.memslot!, flags: s.memslot!.flags & ~1 })),
    backingPageSize: src.backingPageSize,
    ipaBits: src.ipaBits,
    clock: src.clock,
    realtimeSpeed: src.realtimeSpeed,
    seed: src.seed,
    startPaused: true,
    tlbEntries: src.tlbEntries,
    arch: src.arch,
    pml: src.pml,
  });
}

/** Checks the source and creates the destination; nothing needs undoing if this throws. */
export async function prepare(cfg: MigrationConfig, ep: Endpoints): Promise<MigrationRun> {
  const { source } = ep;
  const src = (await callSide(ep, "source", () => source.getVm({ vm: cfg.sourceVm }))).vm!;
  if (src.vcpus.every((v) => v.paused)) {
    throw new MigrationError("precondition", `source VM '${cfg.sourceVm}' is paused; pre-copy migrates a running VM (resume it first)`);
  }
  for (const s of src.memslots) {
    if (s.logging) {
      throw new MigrationError(
        "precondition",
        `slot ${s.memslot!.slot} of source VM '${cfg.sourceVm}' is already logging dirty pages (another migration or tool is using it)`,
      );
    }
  }
  if (cfg.dirtyLimit && src.dirtyRingBytes === 0n) {
    throw new MigrationError(
      "usage",
      `dirty-limit requires KVM with accelerator property 'dirty-ring-size' set: source VM '${cfg.sourceVm}' has no dirty ring (create it with one and migrate with --mechanism ring)`,
    );
  }
  const run = new MigrationRun(cfg, ep, src);
  await run.on("destination", () => createDestination(ep.destination, cfg.destinationVm, src));
  run.did.destinationCreated = true;
  return run;
}

/** Turns logging on; round 0 starts when this returns. */
export async function startLogging(run: MigrationRun): Promise<void> {
  run.progress("setup");
  run.did.trackerStarted = true;
  const setupNs = await run.on("source", () => run.tracker.start());
  await run.elapse(setupNs);
  run.report.setupTimeMs = run.clock.now() / 1e6;
}
