/**
 * FEAT_HDBSS (Armv9.5) as the Huawei KVM series v3 drives it
 * (KVM_CAP_ARM_HW_DIRTY_STATE_TRACK): each vCPU has a buffer of
 * 4 KiB x 2^order (512 to 262,144 entries of 8 bytes). A write fault while
 * logging maps its page with DBM, so the first write to a page faults and
 * KVM logs it; a later clean -> dirty update by hardware appends the page's
 * IPA to the writing vCPU's buffer, with no fault. An update that finds the
 * buffer full does not happen: the access takes a stage-2 permission fault
 * with ESR_EL2.ISS2.HDBSSF = 1, KVM flushes the buffer into the dirty log and
 * resumes, and the access is retried (vcpu-dirty-log.ts has that shared
 * machinery). kvm_arch_sync_dirty_log has every vCPU flush
 * (KVM_REQ_FLUSH_HDBSS) before GET, and vcpu_put flushes too. No
 * performance figure has been published: every cost here is an assumption.
 */
import type { CostModel } from "./cost-model.js";
import type { HardwareDirty, HardwareDirtyVm } from "./hardware-dirty.js";
import { VcpuDirtyLog } from "./vcpu-dirty-log.js";

export const MAX_ORDER = 9;
/** An entry: IPA in bits [55:12], TTWL (the level, 3 for a page) in bits [3:1], valid in bit 0. */
const ENTRY_LOW_BITS = (3 << 1) | 1;
const TWO32 = 4294967296;

export const hdbssEntries = (order: number) => (4096 << order) / 8;

export class Hdbss extends VcpuDirtyLog implements HardwareDirty {
  readonly name = "hdbss";
  readonly dbmOnProtect = false;
  override readonly dbmOnFault = true;
  /** Each vCPU's buffer as the hardware writes it: 8-byte entries, low and high words. */
  private readonly buffers: Int32Array[];

  constructor(
    vm: HardwareDirtyVm,
    vcpus: number,
    readonly order: number,
    costs: CostModel,
  ) {
    super(vm, vcpus, hdbssEntries(order), { entryNs: costs.hdbssEntryNs, fullNs: costs.hdbssFullFaultNs, drainEntryNs: costs.hdbssFlushEntryNs }, "hdbssFullFaults");
    this.buffers = Array.from({ length: vcpus }, () => new Int32Array(2 * this.entries));
  }

  /** What the buffers take, for the memory budget before they exist. */
  static bytesFor(vcpus: number, order: number): number {
    return vcpus * (hdbssEntries(order) * 8 + 4);
  }

  get allocatedBytes(): number {
    return this.buffers.length * this.entries * 8 + this.used.byteLength;
  }

  protected store(i: number, k: number, gfn: number): void {
    const ipa = gfn * 4096;
    this.buffers[i][2 * k] = (ipa % TWO32) | ENTRY_LOW_BITS;
    this.buffers[i][2 * k + 1] = Math.floor(ipa / TWO32);
  }

  protected load(i: number, k: number): number {
    const lo = this.buffers[i][2 * k] >>> 0;
    if (!(lo & 1)) return -1;
    return (this.buffers[i][2 * k + 1] * TWO32 + (lo - (lo % 4096))) / 4096;
  }
}
