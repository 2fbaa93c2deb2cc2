/**
 * The kernel's dirty_log_test invariant (tools/testing/selftests/kvm/dirty_log_test.c),
 * driven over gRPC: the guest writes the iteration number into random pages;
 * each iteration collects once mid-run, then stops the vCPU and collects
 * again; every page reported dirty must hold the current iteration and every
 * other page less. The collect step is the mechanism under test.
 */
import type { HypervisorClient } from "../services/hypervisor/client.js";
import { Arch, ManualProtectFlag, Capability, MemslotFlag, WorkloadPattern, WriteValue, type SetFaultInjectionRequest } from "../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { bit, GiB } from "./hypervisor-harness.js";

/** vcpusRun: the vCPUs keep running through the collection's ioctls (GetDirtyLogRequest.vcpus_run). */
export type Collect = (c: HypervisorClient, vm: string, slot: number, numPages: number, vcpusRun?: boolean) => Promise<Uint8Array>;

/** dirty-log mode: one GET (snapshot, clear, re-protect). */
export const collectDirtyLog: Collect = async (c, vm, slot, _n, vcpusRun = false) => (await c.getDirtyLog({ vm, slot, vcpusRun })).bitmap;

/** clear-log mode: GET with manual protect, then CLEAR of the whole slot with what GET returned. */
export const collectClearLog: Collect = async (c, vm, slot, numPages, vcpusRun = false) => {
  const { bitmap } = await c.getDirtyLog({ vm, slot, vcpusRun });
  await c.clearDirtyLog({ vm, slot, firstPage: 0n, numPages, bitmap: Buffer.from(bitmap), vcpusRun });
  return bitmap;
};

/**
 * dirty-ring mode: harvest vCPU 0's ring until empty, then reset; like the
 * selftest, insist that RESET returns exactly the number of entries collected.
 */
export const collectDirtyRing: Collect = async (c, vm, slot, numPages, vcpusRun = false) => {
  const bitmap = new Uint8Array(Math.ceil(numPages / 64) * 8);
  let harvested = 0;
  for (;;) {
    const r = await c.harvestDirtyRing({ vm, vcpu: 0, vcpusRun });
    if (r.count === 0) break;
    const dv = new DataView(r.entries.buffer, r.entries.byteOffset, r.entries.byteLength);
    for (let i = 0; i < r.count; i++) {
      if (dv.getUint32(i * 16 + 4, true) !== slot) throw new Error("entry for another slot");
      const off = Number(dv.getBigUint64(i * 16 + 8, true));
      bitmap[off >>> 3] |= 1 << (off & 7);
    }
    harvested += r.count;
  }
  const reset = await c.resetDirtyRings({ vm, vcpusRun });
  if (Number(reset.cleared) !== harvested) throw new Error(`RESET cleared ${reset.cleared} entries, ${harvested} were harvested`);
  return bitmap;
};

export interface SelftestResult {
  iterations: number;
  pages: number;
  /** Pages reported dirty that do not hold the iteration (beyond the selftest's allowed exceptions). */
  falseDirty: number;
  /** Pages that hold the iteration but were not reported dirty: lost dirty pages. */
  lost: number;
  dirtyPerIteration: number[];
}

export async function runSelftest(
  c: HypervisorClient,
  opts: {
    vm: string;
    collect: Collect;
    initiallySet?: boolean;
    /** Create the VM with a dirty ring of this many bytes (ACQ_REL, as arm64 offers). */
    ringBytes?: number;
    /** Runs after the VM exists and before its slot starts logging (e.g. to turn on DBM or the device). */
    beforeLogging?: (c: HypervisorClient, vm: string) => Promise<void>;
    iterations?: number;
    /** More of the VM's creation: its architecture, PML. */
    create?: { arch?: Arch; pml?: boolean };
    /** The mid-iteration collection runs with the vCPU running through it, as on a real host. */
    vcpusRun?: boolean;
    /** Bugs to switch on before logging starts (SetFaultInjection), to show the invariant catches them. */
    inject?: Omit<Partial<SetFaultInjectionRequest>, "vm">;
    /** Guest time per half iteration. */
    halfNs?: bigint;
    writesPerSecond?: number;
  },
): Promise<SelftestResult> {
  const slot = 1;
  const pages = GiB / 4096 + 3; // 1 GiB + 3 pages, deliberately not a multiple of 64
  const iterations = opts.iterations ?? 6;
  await c.createVm({
    vm: opts.vm,
    vcpus: 1,
    seed: 0x5eedn,
    ...opts.create,
    dirtyRing: opts.ringBytes ? { capability: Capability.CAPABILITY_DIRTY_LOG_RING_ACQ_REL, bytes: BigInt(opts.ringBytes) } : undefined,
  });
  if (opts.initiallySet) {
    const flags = ManualProtectFlag.MANUAL_PROTECT_FLAG_MANUAL_PROTECT_ENABLE | ManualProtectFlag.MANUAL_PROTECT_FLAG_INITIALLY_SET;
    await c.enableCap({ vm: opts.vm, capability: Capability.CAPABILITY_MANUAL_DIRTY_LOG_PROTECT2, args: [BigInt(flags)] });
  }
  if (opts.inject) await c.setFaultInjection({ ...opts.inject, vm: opts.vm });
  await opts.beforeLogging?.(c, opts.vm);
  await c.setUserMemoryRegion({
    vm: opts.vm,
    memslot: { slot, guestPhysAddr: BigInt(GiB), memorySize: BigInt(pages * 4096), flags: MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES },
  });
  const result: SelftestResult = { iterations, pages, falseDirty: 0, lost: 0, dirtyPerIteration: [] };
  for (let it = 1; it <= iterations; it++) {
    await c.setWorkload({
      vm: opts.vm,
      workload: {
        pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM,
        writesPerSecond: opts.writesPerSecond ?? 2e6,
        value: WriteValue.WRITE_VALUE_EPOCH,
        epoch: BigInt(it),
        seed: BigInt(it),
      },
    });
    await c.advanceVm({ vm: opts.vm, durationNs: opts.halfNs ?? 5_000_000n });
    const mid = await opts.collect(c, opts.vm, slot, pages, opts.vcpusRun);
    await c.advanceVm({ vm: opts.vm, durationNs: opts.halfNs ?? 5_000_000n });
    await c.pauseVm({ vm: opts.vm });
    const end = await opts.collect(c, opts.vm, slot, pages);
    const values = new BigUint64Array(pages);
    let off = 0;
    for await (const ch of c.readMemory({ vm: opts.vm, slot })) {
      const bytes = ch.chunk!.contents;
      new Uint8Array(values.buffer).set(bytes, off);
      off += bytes.length;
    }
    let dirtyCount = 0;
    for (let p = 0; p < pages; p++) {
      const v = values[p];
      if (bit(mid, p) | bit(end, p)) {
        dirtyCount++;
        const initiallySetZero = opts.initiallySet && it === 1 && v === 0n;
        if (v !== BigInt(it) && !initiallySetZero) result.falseDirty++;
      } else if (v >= BigInt(it)) result.lost++;
    }
    result.dirtyPerIteration.push(dirtyCount);
    await c.resumeVm({ vm: opts.vm });
  }
  await c.destroyVm({ vm: opts.vm });
  return result;
}
