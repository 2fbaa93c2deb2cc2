/**
 * FEAT_HDBSS (Armv9.5) as the Huawei KVM series v3 drives it
 * (KVM_CAP_ARM_HW_DIRTY_STATE_TRACK): each vCPU has a buffer of
 * 4 KiB x 2^order (512 to 262,144 entries of 8 bytes). A write fault while
 * logging maps its page with DBM, so the first write to a page faults and
 * KVM logs it; a later clean -> dirty update by hardware appends the page's
 * IPA to the writing vCPU's buffer, with no fault. An update that finds the
 * buffer full does not happen: the access takes a stage-2 permission fault
 * with ESR_EL2.ISS2.HDBSSF = 1, KVM flushes the buffer into the dirty log and
 * resumes, and the access is retried. So one vCPU writing N distinct
 * writable-clean pages takes exactly ceil(N / entries) - 1 such faults.
 * kvm_arch_sync_dirty_log has every vCPU flush (KVM_REQ_FLUSH_HDBSS) before
 * GET, and vcpu_put flushes too. No performance figure has been published:
 * every cost here is an assumption of the cost model.
 */
import type { CostModel } from "./cost-model.js";
import type { HardwareDirty, HardwareDirtyVm } from "./hardware-dirty.js";
import type { Memslot } from "./memslot.js";
import type { Vcpu } from "./vcpu.js";

export const MAX_ORDER = 9;
/** An entry: IPA in bits [55:12], TTWL (the level, 3 for a page) in bits [3:1], valid in bit 0. */
const ENTRY_LOW_BITS = (3 << 1) | 1;
const TWO32 = 4294967296;

export const hdbssEntries = (order: number) => (4096 << order) / 8;

export class Hdbss implements HardwareDirty {
  readonly name = "hdbss";
  readonly dbmOnProtect = false;
  readonly dbmOnFault = true;
  readonly entries: number;
  /** Each vCPU's buffer as the hardware writes it: 8-byte entries, low and high words. */
  private readonly buffers: Int32Array[];
  /** HDBSSPROD_EL2.INDEX of each vCPU: the next entry to write. */
  readonly index: Int32Array;

  constructor(
    private readonly vm: HardwareDirtyVm,
    vcpus: number,
    readonly order: number,
    private readonly costs: CostModel,
  ) {
    this.entries = hdbssEntries(order);
    this.buffers = Array.from({ length: vcpus }, () => new Int32Array(2 * this.entries));
    this.index = new Int32Array(vcpus);
  }

  /** What the buffers take per vCPU count, for the memory budget before they exist. */
  static bytesFor(vcpus: number, order: number): number {
    return vcpus * (hdbssEntries(order) * 8 + 4);
  }

  get allocatedBytes(): number {
    return this.buffers.length * this.entries * 8 + this.index.byteLength;
  }

  recorded(v: Vcpu, _slot: Memslot, _p: number, gfn: number): number {
    let cost = this.costs.hdbssEntryNs;
    const i = v.index;
    if (this.index[i] === this.entries) {
      // HDBSSF: the update did not happen; KVM flushes and resumes, and the retried access appends.
      const faultNs = this.costs.hdbssFullFaultNs + this.flush(v).entries * this.costs.hdbssFlushEntryNs;
      v.count({ hdbssFullFaults: 1, overheadNs: faultNs });
      cost += faultNs;
    }
    const ipa = gfn * 4096;
    const buf = this.buffers[i];
    const k = this.index[i]++;
    buf[2 * k] = (ipa % TWO32) | ENTRY_LOW_BITS;
    buf[2 * k + 1] = Math.floor(ipa / TWO32);
    return cost;
  }

  /**
   * kvm_flush_hdbss_buffer: every valid entry below INDEX marked dirty
   * (kvm_vcpu_mark_page_dirty), INDEX back to 0. Returns the entries and the
   * pages that were not dirty yet.
   */
  flush(v: Vcpu): { entries: number; added: number } {
    const i = v.index;
    const n = this.index[i];
    const buf = this.buffers[i];
    let added = 0;
    for (let k = 0; k < n; k++) {
      const lo = buf[2 * k] >>> 0;
      if (!(lo & 1)) continue;
      if (this.vm.markGfnDirty(v, (buf[2 * k + 1] * TWO32 + (lo - (lo % 4096))) / 4096)) added++;
    }
    this.index[i] = 0;
    return { entries: n, added };
  }

  /** KVM_REQ_FLUSH_HDBSS to every vCPU before GET: all buffers drain into the log. */
  sync(): { pages: number; hostNs: number } {
    // The injected bug: the buffers are not drained before the log is read.
    if (this.vm.injected.skipHwLogDrain) return { pages: 0, hostNs: 0 };
    return this.flushAll();
  }

  private flushAll(): { pages: number; hostNs: number } {
    let entries = 0;
    let pages = 0;
    for (const v of this.vm.vcpus) {
      const f = this.flush(v);
      entries += f.entries;
      pages += f.added;
    }
    return { pages, hostNs: entries * this.costs.hdbssFlushEntryNs };
  }

  vcpuPut(v: Vcpu): void {
    if (!this.vm.injected.skipHwLogDrain) this.flush(v);
  }

  stop(): void {
    this.flushAll();
  }
}
