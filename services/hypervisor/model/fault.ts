/**
 * The write-fault handler (arm64's user_mem_abort, x86's EPT-violation path
 * in the TDP MMU; the model's state machine is the same on both): a
 * write-tracked page is never made writable, so the write is emulated,
 * logged and notified. Otherwise, while the slot is logging, map a 4 KiB page
 * (breaking a block first, its other pages to fault back in), make it
 * writable and mark it dirty, with DBM when the assist wants later writes to
 * be the hardware's (seed 000, HDBSS); with logging off, map the largest
 * block the backing (and write tracking) allows, coalescing any table below it.
 */
import type { CostModel } from "./cost-model.js";
import { BLOCK_RW, HI_DBM, PAGES_1G, PAGES_2M, PAGE_RO, PAGE_RW, S2AP_W } from "./descriptor.js";
import type { HardwareDirty } from "./hardware-dirty.js";
import type { Memslot } from "./memslot.js";
import { Level } from "./stage2.js";
import type { Vcpu } from "./vcpu.js";
import type { BackingPageSize, LogTarget, WriteOutcome } from "./vm.js";
import type { WriteTracker } from "./write-track.js";

/** What the handler needs of its VM. */
export interface FaultingVm {
  readonly costs: CostModel;
  readonly writeTrack: WriteTracker;
  readonly hw: HardwareDirty | null;
  readonly config: { readonly backing: BackingPageSize };
  markPageDirty(v: Vcpu | null, slot: Memslot, p: number): LogTarget;
  invalidateRangeAll(gfn: number, n: number): void;
}

/** Handles vCPU v's write fault on page p of slot (leaf at level); (lo, hi) is the value written, t its time. */
export function handleWriteFault(vm: FaultingVm, v: Vcpu, slot: Memslot, p: number, gfn: number, level: Level, lo: number, hi: number, t: number): WriteOutcome {
  const s2 = slot.s2;
  const c = vm.costs;
  if (vm.writeTrack.isTracked(slot, p)) {
    if (level === Level.Unmapped) s2.mapPage(p, PAGE_RO);
    const logged = vm.markPageDirty(v, slot, p) !== "none";
    vm.writeTrack.emit({ kind: "write", gpa: gfn * 4096, valueLo: lo, valueHi: hi, vcpu: v.index, timeNs: t });
    return { fault: "tracked", logged, mmio: false, costNs: c.writeFaultNs + c.emulatedWriteNs };
  }
  if (slot.logging) {
    if (level === Level.Block2M || level === Level.Block1G) {
      const pages = level === Level.Block1G ? PAGES_1G : PAGES_2M;
      s2.splitBlockAt(p, false);
      vm.invalidateRangeAll(Math.floor(gfn / pages) * pages, pages);
      s2.mapPage(p, PAGE_RW);
    } else if (level === Level.Page) s2.setPageAttrs(p, PAGE_RW);
    else s2.mapPage(p, PAGE_RW);
    if (vm.hw?.dbmOnFault) s2.pte.hi[p] |= HI_DBM;
  } else {
    const target = blockLevelFor(vm, slot, p);
    if (target === Level.Page) {
      if (level === Level.Page) s2.setPageAttrs(p, PAGE_RW);
      else s2.mapPage(p, PAGE_RW);
    } else if (level === target) {
      const [pl, i] = s2.leafRef(p, level);
      pl.lo[i] |= S2AP_W;
    } else {
      const pages = target === Level.Block1G ? PAGES_1G : PAGES_2M;
      s2.mapBlock(p, target, BLOCK_RW);
      vm.invalidateRangeAll(Math.floor(gfn / pages) * pages, pages);
    }
  }
  v.tlb.fill(gfn);
  const logged = vm.markPageDirty(v, slot, p) !== "none";
  const kind = level === Level.Unmapped ? "translation" : "permission";
  return { fault: kind, logged, mmio: false, costNs: kind === "translation" ? c.translationFaultNs : c.writeFaultNs };
}

/** The largest leaf the backing allows at page p, unless write tracking forbids blocks there. */
export function blockLevelFor(vm: FaultingVm, slot: Memslot, p: number): Level.Page | Level.Block2M | Level.Block1G {
  const b = vm.config.backing;
  const wt = vm.writeTrack;
  if (b === "1G" && slot.s2.blockFits(p, PAGES_1G) && !wt.blocksDisallowed(slot, p, PAGES_1G)) return Level.Block1G;
  if (b !== "4K" && slot.s2.blockFits(p, PAGES_2M) && !wt.blocksDisallowed(slot, p, PAGES_2M)) return Level.Block2M;
  return Level.Page;
}
