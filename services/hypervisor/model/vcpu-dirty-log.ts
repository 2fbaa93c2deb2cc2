/**
 * What FEAT_HDBSS and Intel PML share: a log per vCPU, filled by the
 * hardware with no exit, of the frames its writes made dirty. A write that
 * finds its log full traps instead (HDBSSF, PML-full): KVM drains the log into
 * the dirty log (oldest first) and the write is retried into the empty log, so
 * one vCPU writing N distinct clean pages traps exactly ceil(N / entries) - 1
 * times. GET drains every vCPU's log first, and vcpu_put drains the vCPU's.
 * The entry format is each mechanism's own (store / load).
 */
import type { HardwareDirtyVm } from "./hardware-dirty.js";
import type { StepStats, Vcpu } from "./vcpu.js";

export interface VcpuLogCosts {
  /** The hardware writing one entry, on top of the dirty-state update. */
  entryNs: number;
  /** The trap of a full log, before the drain. */
  fullNs: number;
  /** Draining one entry into the dirty log. */
  drainEntryNs: number;
}

export abstract class VcpuDirtyLog {
  readonly dbmOnFault: boolean = false;
  /** Entries each vCPU's log holds now. */
  readonly used: Int32Array;

  protected constructor(
    protected readonly vm: HardwareDirtyVm,
    vcpus: number,
    /** Entries of one vCPU's log. */
    readonly entries: number,
    private readonly costs: VcpuLogCosts,
    /** The vCPU statistic that counts the traps. */
    private readonly trapStat: "hdbssFullFaults" | "pmlFullExits",
  ) {
    this.used = new Int32Array(vcpus);
  }

  /** Writes gfn's entry at position k of vCPU i's log. */
  protected abstract store(i: number, k: number, gfn: number): void;
  /** The frame of the entry at position k of vCPU i's log, or -1 for an entry that is not valid. */
  protected abstract load(i: number, k: number): number;

  recorded(v: Vcpu, _slot: unknown, _p: number, gfn: number): number {
    let cost = this.costs.entryNs;
    const i = v.index;
    if (this.used[i] === this.entries) {
      const trapNs = this.costs.fullNs + this.drain(v).entries * this.costs.drainEntryNs;
      v.count({ [this.trapStat]: 1, overheadNs: trapNs } as Partial<StepStats>);
      cost += trapNs;
    }
    this.store(i, this.used[i]++, gfn);
    return cost;
  }

  /** Every valid entry marked dirty (kvm_vcpu_mark_page_dirty), the log emptied. Returns entries and pages newly dirty. */
  drain(v: Vcpu): { entries: number; added: number } {
    const i = v.index;
    const n = this.used[i];
    let added = 0;
    for (let k = 0; k < n; k++) {
      const gfn = this.load(i, k);
      if (gfn >= 0 && this.vm.markGfnDirty(v, gfn)) added++;
    }
    this.used[i] = 0;
    return { entries: n, added };
  }

  /** Before GET every vCPU's log drains (unless the injected bug skips it). */
  sync(): { pages: number; hostNs: number } {
    if (this.vm.injected.skipHwLogDrain) return { pages: 0, hostNs: 0 };
    return this.drainAll();
  }

  vcpuPut(v: Vcpu): void {
    if (!this.vm.injected.skipHwLogDrain) this.drain(v);
  }

  stop(): void {
    this.drainAll();
  }

  private drainAll(): { pages: number; hostNs: number } {
    let entries = 0;
    let pages = 0;
    for (const v of this.vm.vcpus) {
      const d = this.drain(v);
      entries += d.entries;
      pages += d.added;
    }
    return { pages, hostNs: entries * this.costs.drainEntryNs };
  }
}
