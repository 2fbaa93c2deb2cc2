/**
 * One client must not take the hypervisor down: the memory budget counts
 * every allocation, long guest work runs in slices that let other calls
 * through and stops when its call ends, a bitmap too large to send is
 * refused before anything is cleared, error messages stay small, and a
 * destroyed VM's metric series go with it.
 */
import assert from "node:assert/strict";
import { status } from "@grpc/grpc-js";
import { after, before, describe, test } from "node:test";
import { MemslotFlag, WorkloadPattern } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { MAX_DETAILS_CHARS } from "../../../common/grpc.js";
import { DEFAULT_COSTS } from "../model/cost-model.js";
import { Hypervisor, type CreateVmSpec } from "../model/hypervisor.js";
import { RealtimeDriver } from "../model/clock.js";
import { IDLE } from "../model/workload.js";
import { GiB, MiB, startHypervisor, type RunningHypervisor } from "../../../tests/hypervisor-harness.js";
import { rejects } from "../../../tests/grpc-assert.js";

const LOG = MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES;

const spec = (over: Partial<CreateVmSpec> = {}): CreateVmSpec => ({
  name: "b",
  vcpus: 4,
  memslots: [
    { slot: 0, gpa: GiB, size: 64 * MiB + 12288, flags: LOG },
    { slot: 1, gpa: 2 * GiB + 4096, size: 3 * MiB, flags: 0 },
  ],
  backing: "4K",
  ipaBits: 40,
  eagerSplitChunkSize: 0,
  clock: "stepped",
  realtimeSpeed: 1,
  seed: 1n,
  workload: null,
  startPaused: false,
  tlbEntries: 4096,
  dirtyRing: { capability: 223, bytes: 65536n, withBitmap: true },
  arch: "arm64",
  pml: false,
  ...over,
});

const hv = (budget: number) => new Hypervisor({ memoryBudgetBytes: budget, costs: { ...DEFAULT_COSTS }, allowFaultInjection: false });

describe("the memory budget counts everything a VM allocates", () => {
  test("the budget check predicts exactly what a VM allocates: it fits a budget of that size and not one byte less", () => {
    const big = hv(2 ** 40);
    const used = big.createVm(spec()).allocatedBytes;
    assert.equal(big.memoryInUse, used);
    // TLBs (4 x 4096 x 8 B), rings (4 x 4096 x 9 B) and both slots' logs are in it, not only the pages.
    assert.ok(used > 2 * (64 * MiB) / 4096 * 8 + 4 * 4096 * 8 + 4 * 4096 * 9, `${used} bytes`);
    assert.doesNotThrow(() => hv(used).createVm(spec()));
    assert.throws(() => hv(used - 1).createVm(spec()), /needs .* of hypervisor memory.*ENOMEM/);
  });

  test("TLBs count: 512 vCPUs with 65,536-entry TLBs and no memory are refused by a 128 MiB budget", () => {
    assert.throws(
      () => hv(128 * MiB).createVm(spec({ name: "tlbs", vcpus: 512, tlbEntries: 65536, memslots: [], dirtyRing: null })),
      /VM 'tlbs' \(0 B of guest memory, 512 vCPUs\) needs 258/,
    );
  });

  test("turning logging on allocates the bitmap within the budget, and a refusal leaves the slot as it was", () => {
    const s = spec({ dirtyRing: null, memslots: [{ slot: 0, gpa: GiB, size: 256 * MiB, flags: 0 }] });
    const exact = hv(2 ** 40);
    const vm0 = exact.createVm(s);
    const before = exact.memoryInUse;
    exact.setUserMemoryRegion(vm0, { slot: 0, gpa: GiB, size: 256 * MiB, flags: LOG });
    const bitmap = exact.memoryInUse - before;
    assert.equal(bitmap, (256 * MiB) / 4096 / 8);
    const tight = hv(before + bitmap - 1);
    const vm = tight.createVm(s);
    assert.throws(() => tight.setUserMemoryRegion(vm, { slot: 0, gpa: GiB, size: 256 * MiB, flags: LOG }), /the dirty log of slot 0 needs 8 KiB/);
    assert.equal(vm.slots.get(0)!.logging, false);
    assert.equal(vm.slots.get(0)!.dirtyBitmap, null);
  });
});

describe("no call monopolizes the event loop", () => {
  let h: RunningHypervisor;
  before(async () => (h = await startHypervisor()));
  after(() => h.close());
  const c = () => h.client;
  const busy = async (vm: string) => {
    await c().createVm({
      vm,
      vcpus: 2,
      memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(64 * MiB) }],
      workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, writesPerSecond: 1e8 },
    });
  };

  test("other calls are answered while a long AdvanceVm runs, and the advance still does all its guest time", async () => {
    await busy("long");
    const order: string[] = [];
    // 2 vCPUs x 1e8 writes/s x 0.5 s: tens of millions of writes, seconds of work in slices of 10 ms.
    const adv = c().advanceVm({ vm: "long", durationNs: 500_000_000n }, { deadlineMs: 300_000 }).then((r) => (order.push("advance"), r));
    await new Promise((r) => setTimeout(r, 50));
    await c().listVms({}).then(() => order.push("list"));
    const mid = (await c().getVm({ vm: "long" })).vm!;
    order.push("get");
    const r = await adv;
    assert.deepEqual(order, ["list", "get", "advance"]);
    assert.ok(mid.clockNs > 0n && mid.clockNs < 500_000_000n, `mid-advance clock ${mid.clockNs}`);
    assert.equal(r.clockNs, 500_000_000n);
    assert.ok(r.writes > 10_000_000n, `${r.writes} writes`);
  });

  test("one AdvanceVm at a time per VM; a second one is refused while the first runs", async () => {
    await busy("twice");
    const first = c().advanceVm({ vm: "twice", durationNs: 200_000_000n }, { deadlineMs: 300_000 });
    await new Promise((r) => setTimeout(r, 30));
    await rejects(c().advanceVm({ vm: "twice", durationNs: 1000n }), status.FAILED_PRECONDITION, /already advancing.*EBUSY/);
    await first;
  });

  test("an AdvanceVm stops when its deadline passes, and when its VM is destroyed", async () => {
    await busy("deadline");
    await assert.rejects(c().advanceVm({ vm: "deadline", durationNs: 3_600_000_000_000n }, { deadlineMs: 300 }), (e: { code: number }) => e.code === status.DEADLINE_EXCEEDED);
    // The server stops at its next slice: the clock stays far short of the hour asked for, and later calls work.
    await new Promise((r) => setTimeout(r, 50));
    const clock = (await c().getVm({ vm: "deadline" })).vm!.clockNs;
    assert.ok(clock < 60_000_000_000n, `clock ${clock}`);
    assert.equal((await c().advanceVm({ vm: "deadline", durationNs: 1_000_000n })).clockNs, clock + 1_000_000n);

    await busy("doomed");
    const doomed = c().advanceVm({ vm: "doomed", durationNs: 3_600_000_000_000n }, { deadlineMs: 300_000 });
    const refused = rejects(doomed, status.NOT_FOUND, /destroyed while it advanced/);
    await new Promise((r) => setTimeout(r, 50));
    await c().destroyVm({ vm: "doomed" });
    await refused;
  });

  test("the real-time drive runs guests for a bounded slice per tick and drops what does not fit", () => {
    const h2 = hv(2 ** 40);
    const vm = h2.createVm(
      spec({
        name: "rt",
        clock: "realtime",
        dirtyRing: null,
        memslots: [{ slot: 0, gpa: GiB, size: 64 * MiB, flags: 0 }],
        workload: { ...IDLE, pattern: "uniform", writesPerSecond: 1e9, seed: 1n },
      }),
    );
    let now = 1000;
    const driver = new RealtimeDriver(() => h2.vms.values(), 20, 5, 200, () => now);
    driver.tick(); // takes the wall-clock reference
    now += 100; // 100 ms of wall time: 4 vCPUs x 1e9 writes/s cannot be simulated within a 5 ms slice
    const t0 = performance.now();
    driver.tick();
    assert.ok(performance.now() - t0 < 1000, "the tick returned");
    assert.ok(vm.clockNs > 0 && vm.clockNs < 100e6, `clock ${vm.clockNs}`);
    assert.ok(driver.droppedMs > 0, "the guest time that did not fit is dropped, not owed");
  });
});

describe("what a response can carry, and what a destroyed VM leaves", () => {
  let h: RunningHypervisor;
  // A 64 KiB message limit: a slot of more than 2 GiB has a bitmap that cannot be sent.
  before(async () => (h = await startHypervisor({ maxMessageBytes: 64 * 1024 })));
  after(() => h.close());
  const c = () => h.client;

  test("GET_DIRTY_LOG of a bitmap over the message limit is refused before anything is cleared", async () => {
    await c().createVm({ vm: "huge", vcpus: 1, memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(2 * GiB + 4096 * 64), flags: LOG }] });
    await c().guestWrite({ vm: "huge", writes: [{ vcpu: 0, gpa: BigInt(GiB), value: 1n }, { vcpu: 0, gpa: BigInt(2 * GiB), value: 2n }] });
    await rejects(c().getDirtyLog({ vm: "huge", slot: 0 }), status.RESOURCE_EXHAUSTED, /bitmap is 65544 bytes, over the 65536-byte message limit.*E2BIG/);
    const bm = h.hypervisor.vm("huge").slots.get(0)!.dirtyBitmap!;
    assert.equal(bm[0] & 1, 1, "page 0 is still dirty");
    assert.equal((bm[(GiB / 4096) >>> 5] >>> ((GiB / 4096) & 31)) & 1, 1, "the page at 2 GiB is still dirty");
  });

  test("errors echo a bounded part of the input: a 20,000-character name reaches a default client as INVALID_ARGUMENT / NOT_FOUND", async () => {
    const name = "x".repeat(20_000);
    for (const [call, code] of [
      [c().createVm({ vm: name, vcpus: 1 }), status.INVALID_ARGUMENT],
      [c().getVm({ vm: name }), status.NOT_FOUND],
    ] as const) {
      await assert.rejects(call, (e: { code: number; details: string }) => {
        assert.equal(e.code, code, e.details);
        assert.ok(e.details.length <= MAX_DETAILS_CHARS, `${e.details.length} characters`);
        assert.match(e.details, /20000 characters/);
        return true;
      });
    }
  });

  test("a destroyed VM's metric series are removed", async () => {
    const series = async () => (await fetch(`http://127.0.0.1:${h.httpPort}/metrics`).then((r) => r.text())).split("\n").filter((l) => /vm="churn-/.test(l)).length;
    for (let i = 0; i < 10; i++) {
      const vm = `churn-${i}`;
      await c().createVm({ vm, vcpus: 2, memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(MiB), flags: LOG }] });
      await c().guestWrite({ vm, writes: [{ vcpu: 0, gpa: BigInt(GiB) }] });
      await c().getDirtyLog({ vm, slot: 0 });
      await c().getDirtyLog({ vm, slot: 0 });
    }
    assert.ok((await series()) > 100);
    for (let i = 0; i < 10; i++) await c().destroyVm({ vm: `churn-${i}` });
    assert.equal(await series(), 0);
  });
});
