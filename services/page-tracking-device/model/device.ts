/**
 * The page-tracking device behind seed 000's interface (arm64
 * page_tracking_device, AWS's Graviton Page Tracking Agent): trackers per
 * VMID, reference-counted enable/disable per CPU or for every CPU (-1),
 * per-CPU internal buffers of not-yet-logged GPAs (bounded, drained into the
 * dirty log when full or on flush), and dirty logs from which read_dirty
 * returns each GPA once until it is dirtied again. A log is bounded too: past
 * its capacity GPAs are dropped and the next read says so, so that the reader
 * treats the whole VM as dirty and nothing is lost.
 */
import { alreadyExists, failedPrecondition, invalidArgument, notFound, resourceExhausted } from "../../../common/errors.js";
import { GfnSet } from "./gfn-set.js";
import { GpaQueue } from "./gpa-queue.js";

/** Not-yet-logged GPAs a CPU's buffer holds before it drains into the log. */
export const BUFFER_GPAS = 512;
export const MAX_CPUS = 4096;
export const ALL_CPUS = -1;

export interface DeviceOptions {
  /** GPAs a tracker's dirty log may hold. */
  logCapacity: number;
  /**
   * Trackers the device holds at once (default 64). With logCapacity they
   * bound its memory: per tracker at most logCapacity x about 40 bytes (the
   * log and its de-duplicating set) plus 4 KiB of buffer per CPU that wrote.
   */
  maxTrackers?: number;
}

export const DEFAULT_MAX_TRACKERS = 64;

function checkCpu(cpu: number, what: string): void {
  if (!Number.isInteger(cpu) || cpu < ALL_CPUS || cpu >= MAX_CPUS) throw invalidArgument(`${what}: cpu ${cpu} must be -1 (every CPU) or in [0, ${MAX_CPUS})`, "EINVAL");
}

export class Tracker {
  allCpuRefs = 0;
  readonly cpuRefs = new Map<number, number>();
  private readonly buffers = new Map<number, GpaQueue>();
  private readonly logs = new Map<number, GpaQueue>();
  /** Pages in some CPU's log, for "once until dirtied again". */
  private readonly inLog = new GfnSet();
  private overflowPending = false;
  observed = 0;
  ignored = 0;
  logged = 0;
  overflows = 0;
  flushes = 0;

  constructor(
    readonly id: number,
    readonly vmid: number,
    private readonly capacity: number,
    /** The hypervisor link that allocated it ("" when a tool did). */
    readonly owner: string,
  ) {}

  /** Bytes of this tracker's buffers, logs and set. */
  get allocatedBytes(): number {
    let n = this.inLog.allocatedBytes;
    for (const q of this.buffers.values()) n += q.allocatedBytes;
    for (const q of this.logs.values()) n += q.allocatedBytes;
    return n;
  }

  enabledFor(cpu: number): boolean {
    return this.allCpuRefs > 0 || (this.cpuRefs.get(cpu) ?? 0) > 0;
  }

  get enabled(): boolean {
    return this.allCpuRefs > 0 || this.cpuRefs.size > 0;
  }

  get buffered(): number {
    let n = 0;
    for (const b of this.buffers.values()) n += b.length;
    return n;
  }

  get logLength(): number {
    return this.inLog.size;
  }

  enable(cpu: number): number {
    checkCpu(cpu, "enable_tracking");
    if (cpu === ALL_CPUS) return ++this.allCpuRefs;
    const n = (this.cpuRefs.get(cpu) ?? 0) + 1;
    this.cpuRefs.set(cpu, n);
    return n;
  }

  /** Drops a reference; EBUSY while references for that scope remain. */
  disable(cpu: number): number {
    checkCpu(cpu, "disable_tracking");
    const held = cpu === ALL_CPUS ? this.allCpuRefs : (this.cpuRefs.get(cpu) ?? 0);
    if (held === 0) throw failedPrecondition(`disable_tracking: tracker ${this.id} is not enabled for ${cpu === ALL_CPUS ? "every CPU" : `CPU ${cpu}`}`, "EINVAL");
    const left = held - 1;
    if (cpu === ALL_CPUS) this.allCpuRefs = left;
    else if (left === 0) this.cpuRefs.delete(cpu);
    else this.cpuRefs.set(cpu, left);
    if (left > 0) {
      throw failedPrecondition(`disable_tracking: ${left} reference(s) remain on tracker ${this.id}; tracking stays on, do not flush yet`, "EBUSY");
    }
    return 0;
  }

  /** Writes the hardware agent saw; a CPU not being tracked is ignored. */
  observe(cpu: number, gpas: Float64Array): void {
    if (!this.enabledFor(cpu)) {
      this.ignored += gpas.length;
      return;
    }
    let buf = this.buffers.get(cpu);
    if (!buf) this.buffers.set(cpu, (buf = new GpaQueue()));
    for (let i = 0; i < gpas.length; i++) {
      buf.push(gpas[i]);
      if (buf.length >= BUFFER_GPAS) this.drain(cpu, buf);
    }
    this.observed += gpas.length;
  }

  private drain(cpu: number, buf: GpaQueue): number {
    let log = this.logs.get(cpu);
    if (!log) this.logs.set(cpu, (log = new GpaQueue()));
    const tmp = new Float64Array(buf.length);
    const n = buf.take(tmp, 0, tmp.length);
    for (let i = 0; i < n; i++) {
      const gpa = tmp[i];
      const gfn = Math.floor(gpa / 4096);
      if (this.inLog.has(gfn)) continue;
      if (this.inLog.size >= this.capacity) {
        if (!this.overflowPending) this.overflows++;
        this.overflowPending = true;
        continue;
      }
      this.inLog.add(gfn);
      log.push(gpa);
      this.logged++;
    }
    return n;
  }

  flush(): number {
    this.flushes++;
    let n = 0;
    for (const [cpu, buf] of this.buffers) n += this.drain(cpu, buf);
    return n;
  }

  /** read_dirty_pages: up to max GPAs dirtied by cpu (or any CPU), each once. */
  read(cpu: number, max: number): { gpas: Float64Array; overflowed: boolean; remaining: number } {
    checkCpu(cpu, "read_dirty_pages");
    if (!Number.isInteger(max) || max < 1 || max > 1 << 22) throw invalidArgument(`read_dirty_pages: max ${max} must be in [1, ${1 << 22}]`, "EINVAL");
    const logs = cpu === ALL_CPUS ? [...this.logs.values()] : this.logs.has(cpu) ? [this.logs.get(cpu)!] : [];
    const total = logs.reduce((n, l) => n + l.length, 0);
    const out = new Float64Array(Math.min(max, total));
    let k = 0;
    for (const l of logs) {
      if (k === out.length) break;
      k += l.take(out, k, out.length - k);
    }
    for (let i = 0; i < k; i++) this.inLog.delete(Math.floor(out[i] / 4096));
    const overflowed = this.overflowPending;
    this.overflowPending = false;
    return { gpas: out, overflowed, remaining: total - k };
  }
}

export class PageTrackingDevice {
  readonly trackers = new Map<number, Tracker>();
  private nextId = 1;
  batchesIgnored = 0;
  /** Trackers released because the link that allocated them is gone. */
  orphansReleased = 0;

  constructor(readonly options: DeviceOptions) {}

  get allocatedBytes(): number {
    let n = 0;
    for (const t of this.trackers.values()) n += t.allocatedBytes;
    return n;
  }

  tracker(id: number): Tracker {
    const t = this.trackers.get(id);
    if (!t) throw notFound(`no tracker ${id}`, "ENOENT");
    return t;
  }

  byVmid(vmid: number): Tracker | undefined {
    for (const t of this.trackers.values()) if (t.vmid === vmid) return t;
    return undefined;
  }

  allocate(vmid: number, owner = ""): Tracker {
    if (!Number.isInteger(vmid) || vmid < 1 || vmid > 0xffff) throw invalidArgument(`allocate_tracker: VMID ${vmid} must be in [1, 65535]`, "EINVAL");
    if (owner.length > 256) throw invalidArgument(`allocate_tracker: owner is ${owner.length} characters (at most 256)`, "EINVAL");
    // A new link's allocation shows the previous link is gone: its trackers go first (a restarted hypervisor reuses VMIDs).
    if (owner) this.releaseOrphans(owner);
    const existing = this.byVmid(vmid);
    if (existing) throw alreadyExists(`allocate_tracker: VMID ${vmid} already has tracker ${existing.id}`, "EEXIST");
    const max = this.options.maxTrackers ?? DEFAULT_MAX_TRACKERS;
    if (this.trackers.size >= max) throw resourceExhausted(`allocate_tracker: the device holds ${max} trackers, its limit (PTDEVICE_MAX_TRACKERS)`, "ENOSPC");
    const t = new Tracker(this.nextId++, vmid, this.options.logCapacity, owner);
    this.trackers.set(t.id, t);
    return t;
  }

  /** Releases, enabled or not, every tracker a hypervisor link other than `link` allocated; returns how many. */
  releaseOrphans(link: string): number {
    let n = 0;
    for (const t of [...this.trackers.values()]) {
      if (t.owner && t.owner !== link) {
        this.trackers.delete(t.id);
        n++;
      }
    }
    this.orphansReleased += n;
    return n;
  }

  release(id: number): void {
    const t = this.tracker(id);
    if (t.enabled) throw failedPrecondition(`release_tracker: tracker ${id} is still enabled; disable it first`, "EBUSY");
    this.trackers.delete(id);
  }

  /** A batch from the hypervisor: GPAs a CPU of a VMID wrote without a fault. */
  observe(vmid: number, cpu: number, gpas: Float64Array): void {
    checkCpu(cpu, "report writes");
    if (cpu === ALL_CPUS) throw invalidArgument("report writes: a batch belongs to one CPU, not -1", "EINVAL");
    const t = this.byVmid(vmid);
    if (!t) {
      this.batchesIgnored++;
      return;
    }
    t.observe(cpu, gpas);
  }
}
