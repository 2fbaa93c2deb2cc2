/**
 * A comparison's matrix: lists of mechanisms, architectures, policies and
 * link parameters, crossed into cells. Every cell migrates the same guest
 * (one description, one seed), so a difference between two cells is the
 * cell's doing.
 */
import { vmStateBytes } from "../../../services/hypervisor/model/hypervisor.js";
import { KVM_MEM_LOG_DIRTY_PAGES } from "../../../services/hypervisor/model/memslot.js";
import type { GuestSpec } from "../demo-vm.js";
import { guestMemslots } from "../guest.js";
import { allMechanisms, archOf, MechanismError, parseMechanism, type MechanismSpec } from "../trackers/index.js";
import type { MigrationConfig } from "../types.js";

export type Arch = GuestSpec["arch"];
export const ARCHES: Arch[] = ["arm64", "x86_64"];
/** Named policies; any other entry of the policy axis is a KubeVirt MigrationPolicy file. */
export const POLICIES = ["none", "auto-converge", "dirty-limit", "postcopy"] as const;

export type CellConfig = Omit<MigrationConfig, "sourceVm" | "destinationVm">;

export interface Cell {
  index: number;
  arch: Arch;
  mechanism: MechanismSpec;
  /** A name of POLICIES, or the path of a MigrationPolicy file. */
  policy: string;
  config: CellConfig;
}

/** A matrix that cannot be run as given: exit 2, with what is wrong. */
export class MatrixError extends Error {}

/** A comma-separated axis: its entries, trimmed; empty entries and an empty list are errors. */
export function splitAxis(flag: string, text: string | undefined, fallback: string[]): string[] {
  if (text === undefined) return fallback;
  const items = text.split(",").map((s) => s.trim());
  if (items.length === 0 || items.some((s) => s === "")) throw new MatrixError(`--${flag} '${text}': an empty entry (give a comma-separated list, e.g. ${fallback.join(",") || "a,b"})`);
  const dup = items.find((s, i) => items.indexOf(s) !== i);
  if (dup !== undefined) throw new MatrixError(`--${flag} '${text}': '${dup}' is given twice`);
  return items;
}

/** The (arch, mechanism) pairs: `all` is every valid mechanism of each architecture; an architecture must have every mechanism asked for on it. */
export function mechanismsByArch(mechanisms: string[], archs: Arch[] | null): { arch: Arch; mechanism: MechanismSpec }[] {
  const out: { arch: Arch; mechanism: MechanismSpec }[] = [];
  const chosen = archs ?? ARCHES;
  for (const a of archs ?? []) if (!ARCHES.includes(a)) throw new MatrixError(`--arch '${a}': must be ${ARCHES.join(" or ")}`);
  for (const arch of chosen) {
    for (const text of mechanisms) {
      if (text === "all") {
        for (const m of allMechanisms()) if (archOf(m) === "any" || archOf(m) === arch) out.push({ arch, mechanism: m });
        continue;
      }
      let m: MechanismSpec;
      try {
        m = parseMechanism(text);
      } catch (e) {
        if (e instanceof MechanismError) throw new MatrixError(`--mechanism ${e.message}`);
        throw e;
      }
      const needs = archOf(m);
      if (needs === "any" || needs === arch) out.push({ arch, mechanism: m });
      // Architectures given explicitly must have every mechanism; by default each runs where it exists.
      else if (archs !== null) throw new MatrixError(`--mechanism ${m.name} is ${needs}'s; --arch ${arch} lacks it (drop it, or drop --arch to run each mechanism on the architectures that have it)`);
    }
  }
  const seen = new Set<string>();
  return out.filter((c) => {
    const key = `${c.arch} ${c.mechanism.name}`;
    return !seen.has(key) && seen.add(key);
  });
}

/** Hypervisor memory one cell holds at its peak: the logging source, the destination, and the resume snapshot its verification hashes. */
export function cellMemoryBytes(guest: Omit<GuestSpec, "arch">, mechanism: MechanismSpec): number {
  const slots = guestMemslots(guest.memoryBytes).map((s) => ({ gpa: Number(s.guestPhysAddr), size: Number(s.memorySize), flags: 0 }));
  const ring = mechanism.log === "ring";
  const vm = (logging: boolean) =>
    vmStateBytes({
      vcpus: guest.vcpus,
      memslots: slots.map((s) => ({ ...s, flags: logging ? KVM_MEM_LOG_DIRTY_PAGES : 0 })),
      ring: ring && logging,
      ringBytes: ring && logging ? guest.ringEntries * 16 : 0,
      withBitmap: ring,
      pml: mechanism.assist === "pml",
    });
  return vm(true) + vm(false) + 8 * (guest.memoryBytes / 4096);
}
