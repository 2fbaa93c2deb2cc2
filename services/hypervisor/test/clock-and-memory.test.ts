import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { ClockDrive, MemslotFlag, WorkloadPattern } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import type { HypervisorClient } from "../client.js";
import { status } from "@grpc/grpc-js";
import { rejects } from "../../../tests/grpc-assert.js";
import { GiB, MiB, startHypervisor, type RunningHypervisor } from "../../../tests/hypervisor-harness.js";
import { takeResumeSnapshot } from "../model/guest-memory.js";

/** Creates a VM, runs a fixed schedule of steps and syncs, and returns what a user would compare. */
async function scenario(c: HypervisorClient, vm: string, seed: bigint, pattern: WorkloadPattern) {
  await c.createVm({
    vm,
    vcpus: 3,
    seed,
    memslots: [
      { slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(32 * MiB), flags: MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES },
      { slot: 1, guestPhysAddr: BigInt(2 * GiB), memorySize: BigInt(16 * MiB), flags: MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES },
    ],
    workload: { pattern, writesPerSecond: 400_000, hotFraction: 0.05, hotWriteFraction: 0.95 },
  });
  const dirty: bigint[] = [];
  for (let i = 0; i < 4; i++) {
    await c.advanceVm({ vm, durationNs: 7_000_000n });
    for (const slot of [0, 1]) dirty.push((await c.getDirtyLog({ vm, slot })).dirtyPages);
  }
  const info = (await c.getVm({ vm })).vm!;
  const digest = (await c.getMemoryDigest({ vm })).sha256Hex;
  return { dirty, digest, writes: info.vcpus.map((v) => v.writes), faults: info.vcpus.map((v) => v.writeFaults) };
}

describe("virtual clock and guest memory", () => {
  let h: RunningHypervisor;
  before(async () => (h = await startHypervisor({ realtimeTickMs: 10 })));
  after(() => h.close());

  test("stepped drive is deterministic: the same seed and inputs give the same results", async () => {
    for (const pattern of [WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, WorkloadPattern.WORKLOAD_PATTERN_HOT_COLD, WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL]) {
      const a = await scenario(h.client, `det-a-${pattern}`, 42n, pattern);
      const b = await scenario(h.client, `det-b-${pattern}`, 42n, pattern);
      assert.deepEqual(a, b);
      const other = await scenario(h.client, `det-c-${pattern}`, 43n, pattern);
      if (pattern !== WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL) assert.notEqual(other.digest, a.digest, "another seed writes other pages");
    }
  });

  test("hot/cold concentrates writes: far fewer distinct pages dirtied than uniform at the same rate", async () => {
    const uni = await scenario(h.client, "uni", 7n, WorkloadPattern.WORKLOAD_PATTERN_UNIFORM);
    const hot = await scenario(h.client, "hot", 7n, WorkloadPattern.WORKLOAD_PATTERN_HOT_COLD);
    const sum = (xs: bigint[]) => xs.reduce((a, b) => a + b, 0n);
    assert.ok(sum(hot.dirty) * 2n < sum(uni.dirty), `hot ${sum(hot.dirty)} vs uniform ${sum(uni.dirty)}`);
  });

  test("pages copied with ReadMemory/WriteMemory (all, or selected by a dirty bitmap) make the digests equal", async () => {
    const c = h.client;
    const layout = [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(8 * MiB) }];
    await c.createVm({ vm: "src", vcpus: 2, memslots: layout, workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, writesPerSecond: 1e6 } });
    await c.createVm({ vm: "dst", vcpus: 2, memslots: layout, startPaused: true });
    await c.advanceVm({ vm: "src", durationNs: 2_000_000n });
    const copy = async (bitmap?: Uint8Array) => {
      const chunks = [];
      for await (const r of c.readMemory({ vm: "src", slot: 0, bitmap: bitmap ? Buffer.from(bitmap) : undefined, chunkPages: 512 })) chunks.push({ vm: "dst", chunk: r.chunk });
      return c.writeMemory(chunks);
    };
    await copy();
    assert.equal((await c.getMemoryDigest({ vm: "src" })).sha256Hex, (await c.getMemoryDigest({ vm: "dst" })).sha256Hex);
    await c.setUserMemoryRegion({ vm: "src", memslot: { ...layout[0], flags: MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES } });
    await c.advanceVm({ vm: "src", durationNs: 1_000_000n });
    assert.notEqual((await c.getMemoryDigest({ vm: "src" })).sha256Hex, (await c.getMemoryDigest({ vm: "dst" })).sha256Hex);
    await c.pauseVm({ vm: "src" });
    const log = await c.getDirtyLog({ vm: "src", slot: 0 });
    const w = await copy(log.bitmap);
    assert.equal(w.pagesWritten, log.dirtyPages, "only the dirty pages travel");
    assert.equal((await c.getMemoryDigest({ vm: "src" })).sha256Hex, (await c.getMemoryDigest({ vm: "dst" })).sha256Hex);
  });

  test("a resume snapshot is copied in pieces with the event loop free between them: the VM refuses RPCs meanwhile, other VMs are served, and it is memory at the resume", async () => {
    // 64 GiB: 128 MiB of content words, two pieces (a 1 TiB guest's 2 GiB in one copy held the event loop for 6.7 s).
    const slot = { slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(64 * GiB) };
    await h.client.createVm({ vm: "snap-big", vcpus: 2, memslots: [slot], workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, writesPerSecond: 1e6 } });
    await h.client.createVm({ vm: "snap-other", vcpus: 1, memslots: [{ ...slot, memorySize: BigInt(4 * MiB) }] });
    await h.client.advanceVm({ vm: "snap-big", durationNs: 5_000_000n });
    await h.client.pauseVm({ vm: "snap-big" });
    const before = (await h.client.getMemoryDigest({ vm: "snap-big" })).sha256Hex;
    const vm = h.hypervisor.vm("snap-big");
    let pieces = 0;
    await takeResumeSnapshot(vm, async () => {
      pieces++;
      await rejects(h.client.getVm({ vm: "snap-big" }), status.ABORTED, /VM 'snap-big' is busy taking its resume snapshot; retry when that is done/);
      assert.equal((await h.client.getVm({ vm: "snap-other" })).vm!.vm, "snap-other", "the server answers for other VMs");
    });
    assert.equal(pieces, 2);
    vm.resumeSnapshot = null;
    // Over the API, as a migration's destination resumes: the guest runs on, the snapshot keeps memory as it was.
    await h.client.resumeVm({ vm: "snap-big", snapshot: true });
    await h.client.advanceVm({ vm: "snap-big", durationNs: 5_000_000n });
    assert.notEqual((await h.client.getMemoryDigest({ vm: "snap-big" })).sha256Hex, before, "the guest wrote after the resume");
    assert.equal((await h.client.getMemoryDigest({ vm: "snap-big", atResume: true })).sha256Hex, before, "the snapshot is memory at the resume");
    for (const name of ["snap-big", "snap-other"]) await h.client.destroyVm({ vm: name });
  });

  test("real-time drive: the clock follows the wall clock times the speed factor", async () => {
    await h.client.createVm({ vm: "rt", vcpus: 1, clock: ClockDrive.CLOCK_DRIVE_REALTIME, realtimeSpeed: 10 });
    await new Promise((r) => setTimeout(r, 300));
    const ns = Number((await h.client.getVm({ vm: "rt" })).vm!.clockNs);
    // 300 ms of wall time at 10x is about 3 s of guest time; allow for timer slack either way.
    assert.ok(ns > 1e9 && ns < 6e9, `clock ${ns} ns`);
  });
});
