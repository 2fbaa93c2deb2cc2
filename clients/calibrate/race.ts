/**
 * The never-stopping guest (kvm-harness's race phase, and the KVM
 * selftest's dirty_log_test without its pause): the guest writes the
 * iteration into pages and never stops; every interval the VMM collects the
 * log (GET_DIRTY_LOG with the vCPUs running through it) and then reads every
 * page front to back, which takes it checkNs while the guest goes on. A page whose value
 * changed since the last read but whose bit this collection lacks was
 * written after its word was collected: it is reported one collection later.
 * It must be in the next collection, or it was lost.
 */
import type { HypervisorClient } from "../../services/hypervisor/client.js";
import { Arch, MemslotFlag, WorkloadPattern, WriteValue } from "../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";

export interface RaceResult {
  /** Pages whose value changed between two reads, over every iteration. */
  changed: number;
  /** Of those, pages the collection before the read did not report. */
  late: number;
  lateShare: number;
  /** Late pages the next collection did not report either. */
  lost: number;
}

const GPA = 2 ** 30;

export async function neverStoppingGuest(
  c: HypervisorClient,
  opts: RaceOptions & { arch?: Arch },
): Promise<RaceResult> {
  const { vm, pages } = opts;
  const slot = { slot: 0, guestPhysAddr: BigInt(GPA), memorySize: BigInt(pages * 4096), flags: 0 };
  await c.createVm({ vm, vcpus: 1, arch: opts.arch ?? Arch.ARCH_X86_64, seed: opts.seed, memslots: [slot] });
  try {
    await c.setUserMemoryRegion({ vm, memslot: { ...slot, flags: MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES } });
    return await iterate(c, opts);
  } finally {
    await c.destroyVm({ vm });
  }
}

/** Reads pages [first, first + n) into values. */
async function readInto(c: HypervisorClient, vm: string, values: BigUint64Array, first: number, n: number): Promise<void> {
  const bytes = new Uint8Array(values.buffer, first * 8, n * 8);
  let off = 0;
  for await (const ch of c.readMemory({ vm, slot: 0, firstPage: BigInt(first), numPages: BigInt(n) })) {
    bytes.set(ch.chunk!.contents, off);
    off += ch.chunk!.contents.length;
  }
}

/** SWEEP_STEPS pieces of the read, each after its share of checkNs: page p is read about p / pages of the way through. */
const SWEEP_STEPS = 64;

/** The VMM reads every page, front to back, over checkNs of host time while the guest runs. */
async function sweep(c: HypervisorClient, vm: string, pages: number, checkNs: number): Promise<BigUint64Array> {
  const values = new BigUint64Array(pages);
  if (checkNs <= 0) {
    await readInto(c, vm, values, 0, pages);
    return values;
  }
  for (let s = 0; s < SWEEP_STEPS; s++) {
    const first = Math.floor((s * pages) / SWEEP_STEPS);
    const end = Math.floor(((s + 1) * pages) / SWEEP_STEPS);
    await c.advanceVm({ vm, durationNs: BigInt(Math.round(((s + 1) * checkNs) / SWEEP_STEPS) - Math.round((s * checkNs) / SWEEP_STEPS)) });
    if (end > first) await readInto(c, vm, values, first, end - first);
  }
  return values;
}

export interface RaceOptions {
  vm: string;
  pages: number;
  intervalNs: number;
  /** The VMM's time to read every page after a collection. */
  checkNs: number;
  iterations: number;
  writesPerSecond: number;
  seed: bigint;
  vcpusRun: boolean;
  /**
   * sequential: one sweep from page 0 that goes on across iterations (kvm-harness's guest);
   * uniform: random pages (the kernel selftest's guest).
   */
  pattern: "sequential" | "uniform";
}

/** The guest writes iteration k from now on: a sequential sweep keeps its place (the generator is carried over), a uniform one draws anew. */
async function startIteration(c: HypervisorClient, opts: RaceOptions, k: number): Promise<void> {
  const { vm } = opts;
  const common = { writesPerSecond: opts.writesPerSecond, value: WriteValue.WRITE_VALUE_EPOCH, epoch: BigInt(k) };
  if (opts.pattern === "uniform" || k === 1) {
    const pattern = opts.pattern === "uniform" ? WorkloadPattern.WORKLOAD_PATTERN_UNIFORM : WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL;
    await c.setWorkload({ vm, workload: { ...common, pattern, seed: opts.seed + BigInt(k) } });
    return;
  }
  await c.pauseVm({ vm });
  const state = await c.getVcpuState({ vm });
  await c.setVcpuState({ vm, writeSequence: state.writeSequence, vcpus: state.vcpus.map((v) => ({ ...v, workload: { ...v.workload!, ...common } })) });
  await c.resumeVm({ vm });
}

async function iterate(c: HypervisorClient, opts: RaceOptions): Promise<RaceResult> {
  const { vm, pages } = opts;
  let prev = await sweep(c, vm, pages, 0);
  let pendingLate = new Uint8Array(pages);
  const out: RaceResult = { changed: 0, late: 0, lateShare: 0, lost: 0 };
  for (let k = 1; k <= opts.iterations; k++) {
    await startIteration(c, opts, k);
    await c.advanceVm({ vm, durationNs: BigInt(opts.intervalNs) });
    const { bitmap } = await c.getDirtyLog({ vm, slot: 0, vcpusRun: opts.vcpusRun });
    const values = await sweep(c, vm, pages, opts.checkNs);
    const late = new Uint8Array(pages);
    for (let p = 0; p < pages; p++) {
      const reported = (bitmap[p >>> 3] >> (p & 7)) & 1;
      if (pendingLate[p] && !reported) out.lost++;
      if (values[p] === prev[p]) continue;
      out.changed++;
      if (!reported) {
        out.late++;
        late[p] = 1;
      }
    }
    prev = values;
    pendingLate = late;
  }
  out.lateShare = out.changed > 0 ? out.late / out.changed : 0;
  return out;
}
