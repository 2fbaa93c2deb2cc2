/**
 * Intel PML (x86_64; kvm-dirty-tracking.md section 6, hardware-dirty-logs.md
 * section 3), the model's one x86 hardware assist. With PML on, re-arming
 * dirty logging clears D bits instead of write-protecting (huge pages are
 * still write-protected): a page with W = 1 and D = 0 is the model's
 * writable-clean page, and the write that sets its D bit logs the GPA into
 * the writing vCPU's 512-entry buffer, with no exit. A write that finds the
 * buffer full (the index outside 0-511) exits without setting the D bit or
 * logging (PML-full); KVM drains the buffer into the dirty log (the ring or
 * the bitmap, oldest first, so a ring keeps write order) and re-enters, and
 * the write is retried: one vCPU writing N distinct clean pages with no other
 * exit takes exactly ceil(N / 512) - 1 PML-full exits. Every other exit
 * drains the buffer too, and GET kicks every vCPU so that theirs are drained.
 * The ring reserves the 512 entries a drain may push (kvm_cpu_dirty_log_size).
 */
import type { CostModel } from "./cost-model.js";
import type { HardwareDirty, HardwareDirtyVm } from "./hardware-dirty.js";
import type { Memslot } from "./memslot.js";
import type { Vcpu } from "./vcpu.js";

/** PML_LOG_NR_ENTRIES. */
export const PML_ENTRIES = 512;

export class Pml implements HardwareDirty {
  readonly name = "pml";
  /** Re-arming clears D bits: writable pages become writable-clean. */
  readonly dbmOnProtect = true;
  readonly dbmOnFault = false;
  /** PML drains into rings as well as bitmaps (x86 logs with both). */
  readonly allowsRing = true;
  readonly cpuDirtyLogSize = PML_ENTRIES;
  /** Each vCPU's buffer of GFNs, oldest first (the hardware fills it from the top; the order is what matters). */
  private readonly buffers: Float64Array[];
  /** Entries each vCPU's buffer holds. */
  readonly used: Int32Array;

  constructor(
    private readonly vm: HardwareDirtyVm,
    vcpus: number,
    private readonly costs: CostModel,
  ) {
    this.buffers = Array.from({ length: vcpus }, () => new Float64Array(PML_ENTRIES));
    this.used = new Int32Array(vcpus);
  }

  static bytesFor(vcpus: number): number {
    return vcpus * (PML_ENTRIES * 8 + 4);
  }

  get allocatedBytes(): number {
    return this.buffers.length * PML_ENTRIES * 8 + this.used.byteLength;
  }

  recorded(v: Vcpu, _slot: Memslot, _p: number, gfn: number): number {
    let cost = this.costs.pmlLogNs;
    const i = v.index;
    if (this.used[i] === PML_ENTRIES) {
      // PML-full: the write did not set the D bit; KVM drains and re-enters, and the retried write logs.
      const exitNs = this.costs.pmlFullExitNs + this.drain(v).entries * this.costs.pmlDrainEntryNs;
      v.count({ pmlFullExits: 1, overheadNs: exitNs });
      cost += exitNs;
    }
    this.buffers[i][this.used[i]++] = gfn;
    return cost;
  }

  /** vmx_flush_pml_buffer: every logged GPA marked dirty (kvm_vcpu_mark_page_dirty), oldest first. */
  drain(v: Vcpu): { entries: number; added: number } {
    const i = v.index;
    const n = this.used[i];
    const buf = this.buffers[i];
    let added = 0;
    for (let k = 0; k < n; k++) if (this.vm.markGfnDirty(v, buf[k])) added++;
    this.used[i] = 0;
    return { entries: n, added };
  }

  /** GET kicks every vCPU: their buffers are drained before the log is read. */
  sync(): { pages: number; hostNs: number } {
    // The injected bug: the buffers are not drained before the log is read.
    if (this.vm.injected.skipHwLogDrain) return { pages: 0, hostNs: 0 };
    return this.drainAll();
  }

  private drainAll(): { pages: number; hostNs: number } {
    let entries = 0;
    let pages = 0;
    for (const v of this.vm.vcpus) {
      const d = this.drain(v);
      entries += d.entries;
      pages += d.added;
    }
    return { pages, hostNs: entries * this.costs.pmlDrainEntryNs };
  }

  /** Any VM exit drains the vCPU's buffer. */
  vcpuExit(v: Vcpu): void {
    if (!this.vm.injected.skipHwLogDrain) this.drain(v);
  }

  vcpuPut(v: Vcpu): void {
    if (!this.vm.injected.skipHwLogDrain) this.drain(v);
  }

  stop(): void {
    this.drainAll();
  }
}
