/** How the controller's own VMs (the demo's, the service's) lay out their memory. */
import type { Memslot } from "../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";

/** Where guest RAM starts (below it, on arm64 virt machines, are the devices). */
export const RAM_BASE = 2 ** 30;
/**
 * The largest memslot the controller creates: 1 TiB, whose dirty bitmap
 * (32 MiB) fits one GET response under the servers' 64 MiB message limit with
 * room to spare. Larger guests get several slots, as a VMM splits its RAM.
 */
export const MAX_SLOT_BYTES = 2 ** 40;

/** Memory of the given size from RAM_BASE, in slots 0, 1, ... of at most MAX_SLOT_BYTES. */
export function guestMemslots(memoryBytes: number): Memslot[] {
  const slots: Memslot[] = [];
  for (let off = 0; off < memoryBytes; off += MAX_SLOT_BYTES) {
    slots.push({ slot: slots.length, guestPhysAddr: BigInt(RAM_BASE + off), memorySize: BigInt(Math.min(MAX_SLOT_BYTES, memoryBytes - off)), flags: 0 });
  }
  return slots;
}

/** The smallest IPA size, at least the default 40 bits, that holds memoryBytes of RAM above RAM_BASE. */
export const ipaBitsFor = (memoryBytes: number) => Math.max(40, Math.ceil(Math.log2(RAM_BASE + memoryBytes)));
