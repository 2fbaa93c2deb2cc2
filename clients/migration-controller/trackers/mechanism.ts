/**
 * A dirty-tracking mechanism as three choices: the log (the bitmap or
 * per-vCPU rings), how the bitmap is re-protected (GET snapshots and clears;
 * manual: GET copies and CLEAR re-protects chunk by chunk; initially-set:
 * manual, and nothing protected at enable), and the hardware assist (none,
 * arm64 DBM, the page-tracking device, FEAT_HDBSS; x86 PML). Written `log+choice+…`,
 * e.g. `bitmap+manual+hdbss`; the first milestone's names stay as aliases.
 */
/** A mechanism as the user writes it: an alias (bitmap, ring, dbm, …) or a composition (bitmap+manual+hdbss). */
export type Mechanism = string;

export type Log = "bitmap" | "ring";
export type Protection = "get" | "manual" | "initially-set";
export type Assist = "none" | "dbm" | "device" | "hdbss" | "pml";

export interface MechanismSpec {
  log: Log;
  protection: Protection;
  assist: Assist;
  /** The canonical spelling (the report's and the metrics' label): parts that are not defaults, in order. */
  name: string;
}

const PROTECTIONS: Protection[] = ["get", "manual", "initially-set"];
const ASSISTS: Assist[] = ["none", "dbm", "device", "hdbss", "pml"];

export const PARTS: Record<string, string> = {
  bitmap: "write protection + dirty bitmap (the log)",
  ring: "per-vCPU dirty rings (the log): reaped while pages are sent and at every sync; the backup bitmap at the end",
  get: "GET_DIRTY_LOG snapshots and clears at every sync (the default protection)",
  manual: "MANUAL_DIRTY_LOG_PROTECT2: GET copies, CLEAR re-protects each chunk just before it is sent",
  "initially-set": "manual protect with INITIALLY_SET: no write-protection pass at enable; CLEAR arms it chunk by chunk",
  dbm: "arm64 hardware DBM (seed 003): writes to write-protected pages do not fault; GET scans descriptors",
  device: "arm64 page-tracking device (seed 000): first writes fault, later ones are logged by the device; GET reads it",
  hdbss: "arm64 FEAT_HDBSS: first writes fault, later ones are appended to per-vCPU buffers (512 entries); GET flushes them",
  pml: "x86_64 Intel PML (a VM created with pml): D bits instead of write protection, 512-entry buffers drained at exits and GET",
};

/** The first milestone's names, and what they stand for. */
export const ALIASES: Record<string, string> = {
  "bitmap-manual": "bitmap+manual",
  "bitmap-initially-set": "bitmap+initially-set",
  dbm: "bitmap+dbm",
  device: "bitmap+device",
  hdbss: "bitmap+hdbss",
};

export class MechanismError extends Error {}

function nameOf(log: Log, protection: Protection, assist: Assist): string {
  return [log, protection === "get" ? null : protection, assist === "none" ? null : assist].filter(Boolean).join("+");
}

/** Parses a mechanism (an alias or a composition); throws MechanismError saying what is wrong. */
export function parseMechanism(text: string): MechanismSpec {
  const parts = (ALIASES[text] ?? text).split("+");
  const log = parts[0];
  if (log !== "bitmap" && log !== "ring") {
    throw new MechanismError(`'${text}' must start with the log, bitmap or ring (or be one of ${Object.keys(ALIASES).join(", ")})`);
  }
  let protection: Protection = "get";
  let assist: Assist = "none";
  for (const p of parts.slice(1)) {
    if ((PROTECTIONS as string[]).includes(p) && p !== "get") {
      if (protection !== "get") throw new MechanismError(`'${text}' names two protections (${protection}, ${p})`);
      protection = p as Protection;
    } else if ((ASSISTS as string[]).includes(p) && p !== "none") {
      if (assist !== "none") throw new MechanismError(`'${text}' names two hardware assists (${assist}, ${p}); a VM has at most one`);
      assist = p as Assist;
    } else if (p !== "get" && p !== "none") {
      throw new MechanismError(`'${text}': unknown part '${p}' (protections: manual, initially-set; assists: dbm, device, hdbss, pml)`);
    }
  }
  if (log === "ring" && protection !== "get") throw new MechanismError(`'${text}': rings are re-protected by RESET_DIRTY_RINGS, not by GET or CLEAR`);
  if (log === "ring" && assist !== "none" && assist !== "pml") {
    throw new MechanismError(`'${text}': the arm64 assists sync into bitmaps only, not into rings (KVM refuses them together); PML drains into rings`);
  }
  return { log, protection, assist, name: nameOf(log, protection, assist) };
}

/** The architecture a mechanism needs: PML is x86's, the other assists arm64's; the rest run on both. */
export function archOf(spec: MechanismSpec): "arm64" | "x86_64" | "any" {
  return spec.assist === "pml" ? "x86_64" : spec.assist === "none" ? "any" : "arm64";
}

/** Every valid combination: what `compare` and the tests go over. */
export function allMechanisms(): MechanismSpec[] {
  const out: MechanismSpec[] = [];
  for (const protection of PROTECTIONS) for (const assist of ASSISTS) out.push(parseMechanism(nameOf("bitmap", protection, assist)));
  out.push(parseMechanism("ring"), parseMechanism("ring+pml"));
  return out;
}
