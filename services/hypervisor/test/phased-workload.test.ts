import assert from "node:assert/strict";
import { status } from "@grpc/grpc-js";
import { after, before, describe, test } from "node:test";
import { MemslotFlag, Workload, WorkloadPattern } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { rejects } from "../../../tests/grpc-assert.js";
import { GiB, MiB, startHypervisor, type RunningHypervisor } from "../../../tests/hypervisor-harness.js";

const MS = 1_000_000n;
const slot = { slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(64 * MiB), flags: MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES };
const SWEEP = { first: 8192, pages: 2048 };

/** A database: 10k writes/s of hot-cold for 400 ms, then a 100 ms checkpoint sweeping 2048 pages at 200k/s; repeated. */
const bursty = Workload.fromPartial({
  pattern: WorkloadPattern.WORKLOAD_PATTERN_PHASED,
  phases: [
    { durationNs: 400n * MS, workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_HOT_COLD, writesPerSecond: 10_000, hotFraction: 0.05 } },
    {
      durationNs: 100n * MS,
      workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: 200_000, workingSetFirstPage: BigInt(SWEEP.first), workingSetPages: BigInt(SWEEP.pages) },
    },
  ],
});

/** Every page of the slot dirtied in [start, end) pages, from a GET's bitmap. */
function pagesOf(bitmap: Uint8Array): number[] {
  const out: number[] = [];
  bitmap.forEach((b, i) => {
    for (let k = 0; k < 8; k++) if (b & (1 << k)) out.push(8 * i + k);
  });
  return out;
}

describe("phased workloads", () => {
  let h: RunningHypervisor;
  before(async () => (h = await startHypervisor()));
  after(() => h.close());

  async function writes(vm: string): Promise<number> {
    return Number((await h.client.getVm({ vm })).vm!.vcpus[0].writes);
  }

  /** A VM whose pages are all mapped and write-protected, its clock at touchNs. */
  async function touched(vm: string, touchNs: bigint): Promise<void> {
    await h.client.createVm({ vm, vcpus: 1, seed: 5n, memslots: [slot], workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: 1e8 } });
    await h.client.advanceVm({ vm, durationNs: touchNs });
    await h.client.setWorkload({ vm, workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_IDLE } });
    await h.client.getDirtyLog({ vm, slot: 0 });
  }

  test("a checkpointing database writes at its base rate, then sweeps its checkpoint region at the burst rate, every cycle", async () => {
    await touched("db", 200n * MS);
    await h.client.setWorkload({ vm: "db", workload: bursty });
    const steps: { writes: number; inSweep: number; dirty: number }[] = [];
    for (let i = 0; i < 20; i++) {
      const w0 = await writes("db");
      await h.client.advanceVm({ vm: "db", durationNs: 50n * MS });
      const pages = pagesOf((await h.client.getDirtyLog({ vm: "db", slot: 0 })).bitmap);
      steps.push({ writes: (await writes("db")) - w0, inSweep: pages.filter((p) => p >= SWEEP.first && p < SWEEP.first + SWEEP.pages).length, dirty: pages.length });
    }
    const checkpoint = new Set([8, 9, 18, 19]);
    for (const [i, s] of steps.entries()) {
      if (checkpoint.has(i)) {
        assert.ok(s.writes > 5000, `step ${i} (checkpoint): ${s.writes} writes`);
        assert.ok(s.inSweep > 1000, `step ${i}: the sweep dirties its region (${s.inSweep} pages)`);
      } else {
        assert.ok(s.writes >= 450 && s.writes <= 550, `step ${i} (base): ${s.writes} writes at 10k/s`);
        assert.ok(s.inSweep < 100, `step ${i}: the region is quiet (${s.inSweep} pages)`);
      }
    }
  });

  test("a phased workload migrates with the vCPU state: restored on a VM whose clock differs, it continues with the same dirty pages per interval", async () => {
    await touched("pa", 200n * MS);
    await touched("pb", 900n * MS);
    await h.client.setWorkload({ vm: "pa", workload: bursty });
    // Into the checkpoint: the state carries the phase and how far into it the guest is.
    await h.client.advanceVm({ vm: "pa", durationNs: 430n * MS });
    await h.client.getDirtyLog({ vm: "pa", slot: 0 });
    await h.client.pauseVm({ vm: "pa" });
    await h.client.pauseVm({ vm: "pb" });
    const state = await h.client.getVcpuState({ vm: "pa" });
    await h.client.setVcpuState({ vm: "pb", vcpus: state.vcpus, writeSequence: state.writeSequence });
    await h.client.resumeVm({ vm: "pa" });
    await h.client.resumeVm({ vm: "pb" });
    for (let i = 0; i < 14; i++) {
      const got = await Promise.all(
        ["pa", "pb"].map(async (vm) => {
          await h.client.advanceVm({ vm, durationNs: 50n * MS });
          return pagesOf((await h.client.getDirtyLog({ vm, slot: 0 })).bitmap);
        }),
      );
      assert.deepEqual(got[1], got[0], `interval ${i}: the same pages`);
      assert.ok(got[0].length > 0);
    }
  });

  test("malformed phases are refused with a precise status", async () => {
    await h.client.createVm({ vm: "bad", vcpus: 1, memslots: [slot] });
    const hot = { pattern: WorkloadPattern.WORKLOAD_PATTERN_HOT_COLD, writesPerSecond: 1000 };
    const phased = (phases: { durationNs: bigint; workload?: Partial<Workload> }[]) => Workload.fromPartial({ pattern: WorkloadPattern.WORKLOAD_PATTERN_PHASED, phases });
    const cases: [Workload, RegExp][] = [
      [phased([]), /a phased workload has 1 to 16 phases, not 0/],
      [phased(Array.from({ length: 17 }, () => ({ durationNs: MS, workload: hot }))), /1 to 16 phases, not 17/],
      [phased([{ durationNs: 0n, workload: hot }, { durationNs: MS, workload: hot }]), /workload phase 0: duration_ns 0 \(for ever\) is for the last phase only/],
      [phased([{ durationNs: MS, workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_PHASED } }]), /workload phase 0: a phase cannot itself be phased/],
      [phased([{ durationNs: MS, workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, writesPerSecond: 0 } }]), /workload phase 0: a phase writes/],
      [phased([{ durationNs: MS }]), /workload phase 0 has no workload/],
      [phased([{ durationNs: MS, workload: { ...hot, hotFraction: 2 } }]), /workload phase 0 hot_fraction 2 must be in \(0, 1\]/],
      [Workload.fromPartial({ ...hot, phases: [{ durationNs: MS, workload: hot }] }), /phases are for WORKLOAD_PATTERN_PHASED/],
    ];
    for (const [workload, message] of cases) await rejects(h.client.setWorkload({ vm: "bad", workload }), status.INVALID_ARGUMENT, message);
  });

  test("a trace workload writes each interval's pages once, idles through an empty interval, and malformed traces are refused", async () => {
    await touched("tr", 200n * MS);
    const trace = { intervalNs: 50n * MS, intervals: [{ pages: [1, 2, 3] }, { pages: [] }, { pages: [9000, 9001] }] };
    await h.client.setWorkload({ vm: "tr", workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_TRACE, trace } });
    const got: number[][] = [];
    for (let i = 0; i < 6; i++) {
      await h.client.advanceVm({ vm: "tr", durationNs: 50n * MS });
      got.push(pagesOf((await h.client.getDirtyLog({ vm: "tr", slot: 0 })).bitmap));
    }
    assert.deepEqual(got, [[1, 2, 3], [], [9000, 9001], [1, 2, 3], [], [9000, 9001]], "in a loop");
    assert.equal((await h.client.getVm({ vm: "tr" })).vm!.vcpus[0].workload!.trace!.intervals.length, 0, "VmInfo leaves the pages out");
    const state = await h.client.getVcpuState({ vm: "tr" });
    assert.equal(state.vcpus[0].workload!.trace!.intervals.length, 3, "GetVcpuState carries them");
    const t = (tr: object, extra: object = {}) => Workload.fromPartial({ pattern: WorkloadPattern.WORKLOAD_PATTERN_TRACE, trace: tr, ...extra });
    const cases: [Workload, RegExp][] = [
      [Workload.fromPartial({ pattern: WorkloadPattern.WORKLOAD_PATTERN_TRACE }), /a trace workload needs its trace/],
      [t({ intervalNs: 0n, intervals: [{ pages: [1] }] }), /trace interval_ns must be > 0/],
      [t({ intervalNs: MS, intervals: [] }), /the trace has no intervals/],
      [t({ intervalNs: MS, intervals: [{ pages: [] }] }), /the trace has no pages in any interval/],
      [t({ intervalNs: MS, intervals: [{ pages: [1] }] }, { readsPerSecond: 5 }), /a trace replays writes only/],
      [t({ intervalNs: MS, intervals: [{ pages: [16384] }] }), /workload: trace page 16384 is past the VM's 16384 writable pages/],
      [Workload.fromPartial({ pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, writesPerSecond: 1, trace: { intervalNs: MS, intervals: [] } }), /workload trace is for WORKLOAD_PATTERN_TRACE/],
    ];
    for (const [workload, message] of cases) await rejects(h.client.setWorkload({ vm: "tr", workload }), status.INVALID_ARGUMENT, message);
  });
});
