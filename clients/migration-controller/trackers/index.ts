/** The mechanisms the controller can migrate with, by name. */
import type { VmInfo } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import type { HypervisorClient } from "../../../services/hypervisor/client.js";
import { BitmapTracker } from "./bitmap.js";
import { RingTracker } from "./ring.js";
import type { DirtyTracker } from "./tracker.js";

export const MECHANISMS = {
  bitmap: "write protection + GET_DIRTY_LOG (snapshot and clear at every sync)",
  "bitmap-manual": "MANUAL_DIRTY_LOG_PROTECT2: GET copies, CLEAR re-protects each chunk just before it is sent",
  "bitmap-initially-set": "manual protect with INITIALLY_SET: no write-protection pass at enable; CLEAR arms it chunk by chunk",
  ring: "per-vCPU dirty rings: reaped while pages are sent and at every sync; the backup bitmap at the end",
  dbm: "arm64 hardware DBM (seed 003): writes to write-protected pages do not fault; GET scans descriptors",
  device: "arm64 page-tracking device (seed 000): first writes fault, later ones are logged by the device; GET reads it",
  hdbss: "arm64 FEAT_HDBSS: first writes fault, later ones are appended to per-vCPU buffers (512 entries); GET flushes them",
} as const;

export type Mechanism = keyof typeof MECHANISMS;

export function isMechanism(name: string): name is Mechanism {
  return Object.hasOwn(MECHANISMS, name);
}

export function createTracker(mechanism: Mechanism, client: HypervisorClient, vm: VmInfo): DirtyTracker {
  switch (mechanism) {
    case "bitmap":
    case "bitmap-manual":
    case "bitmap-initially-set":
    case "dbm":
    case "device":
    case "hdbss":
      return new BitmapTracker(mechanism, client, vm);
    case "ring":
      return new RingTracker(client, vm);
  }
}
