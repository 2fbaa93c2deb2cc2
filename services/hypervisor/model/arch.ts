/**
 * What differs between the two architectures where dirty tracking sees it,
 * in one place (arch/arm64/kvm and arch/x86/kvm as the generic code asks
 * them): the capabilities each has, the ring variants it offers, the hardware
 * assists it has, whether write tracking exists, and how a leaf descriptor
 * looks from outside. Everything else, the generic core does the same on both.
 */
import type { HardwareDirtyName } from "./hardware-dirty.js";
import { eptEntry } from "./ept.js";
import { AF, HI_DBM, S2AP_R, S2AP_W, toU64 } from "./descriptor.js";
import type { Level } from "./stage2.js";

export type ArchName = "arm64" | "x86_64";

/** KVM capability numbers (include/uapi/linux/kvm.h, and the series' proposed ones: 239, 245; 1001 is this model's). */
export const CAP = {
  MANUAL_DIRTY_LOG_PROTECT2: 168,
  DIRTY_LOG_RING: 192,
  DIRTY_LOG_RING_ACQ_REL: 223,
  DIRTY_LOG_RING_WITH_BITMAP: 225,
  ARM_EAGER_SPLIT_CHUNK_SIZE: 228,
  ARM_SUPPORTED_BLOCK_SIZES: 229,
  ARM_PAGE_TRACKING_DEVICE: 239,
  ARM_HW_DIRTY_STATE_TRACK: 245,
  ARM_HW_DIRTY_LOG: 1001,
} as const;

export interface LeafView {
  descriptor: bigint;
  readable: boolean;
  writable: boolean;
  accessed: boolean;
  /** x86's D bit; arm64 has none (false). */
  dirty: boolean;
  /** arm64's DBM bit; x86 has none (false). */
  dbm: boolean;
}

export interface ArchSpec {
  readonly name: ArchName;
  /** Capabilities only this architecture has (the other checks them as 0 and refuses them). */
  readonly ownCaps: readonly number[];
  /** The dirty-ring capabilities it offers: arm64 is weakly ordered and offers only ACQ_REL; x86 (TSO) both. */
  readonly ringCaps: readonly number[];
  readonly assists: readonly HardwareDirtyName[];
  /** Write tracking (seed 002, arch/x86/kvm/mmu/page_track.c). */
  readonly writeTracking: boolean;
  /** A leaf descriptor as TranslateGpa shows it. */
  view(lo: number, hi: number, level: Level, pml: boolean): LeafView;
}

const ARM64: ArchSpec = {
  name: "arm64",
  ownCaps: [CAP.ARM_EAGER_SPLIT_CHUNK_SIZE, CAP.ARM_SUPPORTED_BLOCK_SIZES, CAP.ARM_PAGE_TRACKING_DEVICE, CAP.ARM_HW_DIRTY_STATE_TRACK, CAP.ARM_HW_DIRTY_LOG],
  ringCaps: [CAP.DIRTY_LOG_RING_ACQ_REL],
  assists: ["dbm", "device", "hdbss"],
  writeTracking: false,
  view: (lo, hi) => ({
    descriptor: toU64(lo, hi),
    readable: (lo & S2AP_R) !== 0,
    writable: (lo & S2AP_W) !== 0,
    accessed: (lo & AF) !== 0,
    dirty: false,
    dbm: (hi & HI_DBM) !== 0,
  }),
};

const X86_64: ArchSpec = {
  name: "x86_64",
  ownCaps: [],
  ringCaps: [CAP.DIRTY_LOG_RING, CAP.DIRTY_LOG_RING_ACQ_REL],
  assists: ["pml"],
  writeTracking: true,
  view: (lo, hi, level, pml) => ({ ...eptEntry(lo, hi, level, pml), dbm: false }),
};

export const ARCHES: Record<ArchName, ArchSpec> = { arm64: ARM64, x86_64: X86_64 };

/** The architecture that owns a capability, if only one does. */
export function capOwner(cap: number): ArchName | null {
  for (const a of Object.values(ARCHES)) if (a.ownCaps.includes(cap)) return a.name;
  return null;
}
