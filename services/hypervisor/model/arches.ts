/** The architectures, by name, and which one owns a capability. */
import type { ArchName, KvmArch } from "./arch.js";
import { ARM64 } from "./arm64.js";
import { X86_64 } from "./x86.js";

export const ARCHES: Record<ArchName, KvmArch> = { arm64: ARM64, x86_64: X86_64 };

/** The architecture that owns a capability, if only one does. */
export function capOwner(cap: number): ArchName | null {
  for (const a of Object.values(ARCHES)) if (a.ownCaps.includes(cap)) return a.name;
  return null;
}
