/**
 * Write tracking with notifiers (seed 002, and today's kvm_write_track_add_gfn /
 * kvm_page_track_register_notifier in arch/x86/kvm/mmu/page_track.c).
 *
 * A page's tracking is reference-counted like gfn_write_track[] (an unsigned
 * short: past USHRT_MAX the add is refused). A tracked page stays
 * write-protected and the 2 MiB / 1 GiB regions holding it are never mapped as
 * blocks; every guest write to it faults, is emulated, logged, and delivered
 * as a track_write event to every subscriber. Deleting a slot delivers
 * track_remove_region.
 *
 * Subscribers are bounded: each has a queue of at most MAX_QUEUED_EVENTS; one
 * that falls further behind is disconnected with RESOURCE_EXHAUSTED (counted
 * in droppedSubscribers) rather than ever stalling the guest.
 */
import { failedPrecondition, invalidArgument, notFound, resourceExhausted, unimplemented } from "../../../common/errors.js";
import { PAGES_1G, PAGES_2M, PAGE_RO } from "./descriptor.js";
import type { Memslot } from "./memslot.js";
import { Level } from "./stage2.js";
import type { Vm } from "./vm.js";

export const USHRT_MAX = 65535;
export const MAX_QUEUED_EVENTS = 65536;

export type TrackEvent =
  | { kind: "write"; gpa: number; valueLo: number; valueHi: number; vcpu: number; timeNs: number }
  | { kind: "remove-region"; gfn: number; nrPages: number };

export class Subscriber {
  readonly queue: TrackEvent[] = [];
  /** Set when the stream must end: null for a clean end, an error to fail it. */
  closed: { error: Error | null } | null = null;
  private waiter: (() => void) | null = null;

  constructor(readonly id: number) {}

  deliver(e: TrackEvent): boolean {
    if (this.closed) return true;
    if (this.queue.length >= MAX_QUEUED_EVENTS) return false;
    this.queue.push(e);
    this.wake();
    return true;
  }

  close(error: Error | null): void {
    if (!this.closed) this.closed = { error };
    this.wake();
  }

  /** Resolves when there is something to read or the subscription ended. */
  wait(): Promise<void> {
    if (this.queue.length || this.closed) return Promise.resolve();
    return new Promise((resolve) => (this.waiter = resolve));
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = null;
    w?.();
  }
}

/** Per-slot reference counts, and per-region counts that forbid block mappings. */
interface SlotTrack {
  counts: Uint16Array;
  per2m: Map<number, number>;
  per1g: Map<number, number>;
}

export class WriteTracker {
  private readonly slots = new Map<number, SlotTrack>();
  readonly subscribers = new Map<number, Subscriber>();
  private nextId = 1;
  trackedPages = 0;
  events = 0;
  droppedSubscribers = 0;

  /** The reference counts' bytes (2 per page of each slot with a tracked page). */
  get allocatedBytes(): number {
    let n = 0;
    for (const t of this.slots.values()) n += t.counts.byteLength;
    return n;
  }

  /** What tracking a first page of slot allocates. */
  bytesToTrack(slot: Memslot): number {
    return this.of(slot) ? 0 : 2 * slot.npages;
  }

  private of(slot: Memslot): SlotTrack | undefined {
    return this.slots.get(slot.id);
  }

  count(slot: Memslot, p: number): number {
    return this.of(slot)?.counts[p] ?? 0;
  }

  isTracked(slot: Memslot, p: number): boolean {
    return this.slots.size > 0 && this.count(slot, p) > 0;
  }

  /** Does the block of the given size that holds page p contain a tracked page? */
  blocksDisallowed(slot: Memslot, p: number, pagesPerBlock: number): boolean {
    const t = this.of(slot);
    if (!t) return false;
    const region = Math.floor((slot.baseGfn + p) / pagesPerBlock);
    return ((pagesPerBlock === PAGES_1G ? t.per1g : t.per2m).get(region) ?? 0) > 0;
  }

  /** kvm_write_track_add_gfn: returns the new count (1 means the page just became tracked). */
  add(slot: Memslot, p: number): number {
    let t = this.of(slot);
    if (!t) {
      t = { counts: new Uint16Array(slot.npages), per2m: new Map(), per1g: new Map() };
      this.slots.set(slot.id, t);
    }
    if (t.counts[p] === USHRT_MAX) {
      throw resourceExhausted(`write tracking: GFN 0x${(slot.baseGfn + p).toString(16)} is already tracked ${USHRT_MAX} times (USHRT_MAX)`, "ENOSPC");
    }
    if (++t.counts[p] === 1) {
      this.trackedPages++;
      this.bump(t, slot, p, 1);
    }
    return t.counts[p];
  }

  /** kvm_write_track_remove_gfn: returns the new count. */
  remove(slot: Memslot, p: number): number {
    const t = this.of(slot);
    if (!t || t.counts[p] === 0) {
      throw failedPrecondition(`write tracking: GFN 0x${(slot.baseGfn + p).toString(16)} is not tracked`, "EINVAL");
    }
    if (--t.counts[p] === 0) {
      this.trackedPages--;
      this.bump(t, slot, p, -1);
    }
    return t.counts[p];
  }

  private bump(t: SlotTrack, slot: Memslot, p: number, d: number): void {
    const gfn = slot.baseGfn + p;
    for (const [m, size] of [
      [t.per2m, PAGES_2M],
      [t.per1g, PAGES_1G],
    ] as const) {
      const r = Math.floor(gfn / size);
      const n = (m.get(r) ?? 0) + d;
      if (n === 0) m.delete(r);
      else m.set(r, n);
    }
  }

  /** The slot is going away: its tracking ends, subscribers hear track_remove_region. */
  removeSlot(slot: Memslot): void {
    const t = this.of(slot);
    if (t) {
      for (let p = 0; p < slot.npages; p++) if (t.counts[p]) this.trackedPages--;
      this.slots.delete(slot.id);
    }
    this.emit({ kind: "remove-region", gfn: slot.baseGfn, nrPages: slot.npages });
  }

  emit(e: TrackEvent): void {
    this.events++;
    for (const s of this.subscribers.values()) {
      if (!s.deliver(e)) {
        this.droppedSubscribers++;
        this.subscribers.delete(s.id);
        s.close(resourceExhausted(`write-tracking subscriber ${s.id} fell more than ${MAX_QUEUED_EVENTS} events behind and was disconnected (the guest is never stalled for a subscriber)`));
      }
    }
  }

  subscribe(): Subscriber {
    const s = new Subscriber(this.nextId++);
    this.subscribers.set(s.id, s);
    return s;
  }

  unsubscribe(id: number): void {
    const s = this.subscribers.get(id);
    if (!s) throw notFound(`no write-tracking subscription ${id} (already unsubscribed?)`, "ENOENT");
    this.subscribers.delete(id);
    s.close(null);
  }

  /** The VM is going away: every stream ends. */
  closeAll(reason: Error): void {
    for (const s of this.subscribers.values()) s.close(reason);
    this.subscribers.clear();
  }
}

/** Write tracking is x86's (arch/x86/kvm/mmu/page_track.c): arm64 KVM has no such interface. */
export function writeTrackerOf(vm: Vm, what: string): WriteTracker {
  if (!vm.arch.writeTracking) throw unimplemented(`${what}: write tracking is x86's (arch/x86/kvm/mmu/page_track.c); VM ${vm.name} is ${vm.arch.name}`, "EOPNOTSUPP");
  return vm.writeTrack;
}

function slotOfGfn(vm: Vm, gfn: number, what: string): Memslot {
  for (const s of vm.slots.values()) if (s.containsGfn(gfn)) return s;
  throw invalidArgument(`${what}: GFN 0x${gfn.toString(16)} is not in any memslot of VM ${vm.name}`, "EINVAL");
}

/**
 * kvm_write_track_add_gfn: the first reference write-protects the page; a
 * block holding it is split so that the page is mapped on its own. Returns
 * the new count.
 */
export function addWriteTracking(vm: Vm, gfn: number): number {
  const what = "write track add";
  const wt = writeTrackerOf(vm, what);
  const slot = slotOfGfn(vm, gfn, what);
  const p = gfn - slot.baseGfn;
  const n = wt.add(slot, p);
  if (n === 1) {
    const level = slot.s2.leafLevel(p);
    if (level === Level.Block1G || level === Level.Block2M) slot.s2.splitBlockAt(p, true);
    if (slot.s2.leafLevel(p) === Level.Page) slot.s2.setPageAttrs(p, PAGE_RO);
    vm.flushAllTlbs();
  }
  return n;
}

/** kvm_write_track_remove_gfn: returns the new count. */
export function removeWriteTracking(vm: Vm, gfn: number): number {
  const what = "write track remove";
  const wt = writeTrackerOf(vm, what);
  const slot = slotOfGfn(vm, gfn, what);
  return wt.remove(slot, gfn - slot.baseGfn);
}
