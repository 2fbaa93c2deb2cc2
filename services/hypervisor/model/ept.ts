/**
 * x86_64's view of the model's leaf descriptors: an EPT entry with R/W/X in
 * bits 0-2, the memory type (write-back, 6) in bits 3-5, the large-page bit 7
 * for 2 MiB / 1 GiB leaves, and the accessed and dirty bits 8 and 9. The
 * model keeps one state machine for both architectures: a writable-clean
 * page (arm64: DBM with S2AP_W clear) is an EPT entry with W = 1 and D = 0
 * when PML is on, and a write-protected one (W = 0) otherwise; writable-dirty
 * is W = 1 and D = 1.
 */
import { AF, HI_DBM, outputAddressOf, S2AP_R, S2AP_W } from "./descriptor.js";
import { Level } from "./stage2.js";

export interface EptEntry {
  descriptor: bigint;
  readable: boolean;
  writable: boolean;
  accessed: boolean;
  dirty: boolean;
}

export function eptEntry(lo: number, hi: number, level: Level, pml: boolean): EptEntry {
  const readable = (lo & S2AP_R) !== 0;
  const dirty = (lo & S2AP_W) !== 0;
  const writable = dirty || (pml && (hi & HI_DBM) !== 0);
  const accessed = (lo & AF) !== 0;
  const bits = (readable ? 1 : 0) | (writable ? 2 : 0) | 4 | (6 << 3) | (level !== Level.Page ? 1 << 7 : 0) | (accessed ? 1 << 8 : 0) | (dirty ? 1 << 9 : 0);
  return { descriptor: BigInt(outputAddressOf(lo, hi)) | BigInt(bits), readable, writable, accessed, dirty };
}
