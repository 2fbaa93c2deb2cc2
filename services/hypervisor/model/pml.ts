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
import type { Vcpu } from "./vcpu.js";
import { VcpuDirtyLog } from "./vcpu-dirty-log.js";

/** PML_LOG_NR_ENTRIES. */
export const PML_ENTRIES = 512;

export class Pml extends VcpuDirtyLog implements HardwareDirty {
  readonly name = "pml";
  /** Re-arming clears D bits: writable pages become writable-clean. */
  readonly dbmOnProtect = true;
  /** PML drains into rings as well as bitmaps (x86 logs with both). */
  readonly allowsRing = true;
  readonly cpuDirtyLogSize = PML_ENTRIES;
  /** Each vCPU's buffer of logged GFNs, oldest first (the hardware fills it from the top; the order is what matters). */
  private readonly buffers: Float64Array[];

  constructor(vm: HardwareDirtyVm, vcpus: number, costs: CostModel) {
    super(vm, vcpus, PML_ENTRIES, { entryNs: costs.pmlLogNs, fullNs: costs.pmlFullExitNs, drainEntryNs: costs.pmlDrainEntryNs }, "pmlFullExits");
    this.buffers = Array.from({ length: vcpus }, () => new Float64Array(PML_ENTRIES));
  }

  static bytesFor(vcpus: number): number {
    return vcpus * (PML_ENTRIES * 8 + 4);
  }

  get allocatedBytes(): number {
    return this.buffers.length * PML_ENTRIES * 8 + this.used.byteLength;
  }

  protected store(i: number, k: number, gfn: number): void {
    this.buffers[i][k] = gfn;
  }

  protected load(i: number, k: number): number {
    return this.buffers[i][k];
  }

  /** Any VM exit drains the vCPU's buffer (vmx_flush_pml_buffer at every exit). */
  vcpuExit(v: Vcpu): void {
    if (!this.vm.injected.skipHwLogDrain) this.drain(v);
  }
}
