/** The tracker that drives a mechanism (see mechanism.ts for how one is named). */
import type { VmInfo } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import type { HypervisorClient } from "../../../services/hypervisor/client.js";
import { BitmapTracker } from "./bitmap.js";
import type { MechanismSpec } from "./mechanism.js";
import { RingTracker } from "./ring.js";
import type { DirtyTracker } from "./tracker.js";

export { ALIASES, allMechanisms, MechanismError, parseMechanism, PARTS, type MechanismSpec } from "./mechanism.js";

/** A mechanism as the user writes it: an alias (bitmap, ring, dbm, …) or a composition (bitmap+manual+hdbss). */
export type Mechanism = string;

export function createTracker(spec: MechanismSpec, client: HypervisorClient, vm: VmInfo): DirtyTracker {
  return spec.log === "ring" ? new RingTracker(client, vm) : new BitmapTracker(spec, client, vm);
}
