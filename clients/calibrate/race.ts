/**
 * The never-stopping guest (kvm-harness's race phase, and the KVM
 * selftest's dirty_log_test without its pause): the guest writes the
 * iteration into pages and never stops; every interval the VMM collects the
 * log (GET_DIRTY_LOG with the vCPUs running through it) and then reads every
 * page, which takes it checkNs while the guest goes on. A page whose value
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
  opts: { vm: string; pages: number; intervalNs: number; checkNs: number; iterations: number; writesPerSecond: number; seed: bigint; vcpusRun: boolean; arch?: Arch },
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

async function readValues(c: HypervisorClient, vm: string, pages: number): Promise<BigUint64Array> {
  const values = new BigUint64Array(pages);
  const bytes = new Uint8Array(values.buffer);
  let off = 0;
  for await (const ch of c.readMemory({ vm, slot: 0 })) {
    bytes.set(ch.chunk!.contents, off);
    off += ch.chunk!.contents.length;
  }
  return values;
}

async function iterate(
  c: HypervisorClient,
  opts: { vm: string; pages: number; intervalNs: number; checkNs: number; iterations: number; writesPerSecond: number; seed: bigint; vcpusRun: boolean },
): Promise<RaceResult> {
  const { vm, pages } = opts;
  let prev = await readValues(c, vm, pages);
  let pendingLate = new Uint8Array(pages);
  const out: RaceResult = { changed: 0, late: 0, lateShare: 0, lost: 0 };
  for (let k = 1; k <= opts.iterations; k++) {
    await c.setWorkload({ vm, workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, writesPerSecond: opts.writesPerSecond, value: WriteValue.WRITE_VALUE_EPOCH, epoch: BigInt(k), seed: opts.seed + BigInt(k) } });
    await c.advanceVm({ vm, durationNs: BigInt(opts.intervalNs) });
    const { bitmap } = await c.getDirtyLog({ vm, slot: 0, vcpusRun: opts.vcpusRun });
    if (opts.checkNs > 0) await c.advanceVm({ vm, durationNs: BigInt(opts.checkNs) });
    const values = await readValues(c, vm, pages);
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
