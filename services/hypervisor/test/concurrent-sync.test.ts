/**
 * Syncs with the vCPUs running through them (GetDirtyLogRequest.vcpus_run):
 * the guest's clock moves by the ioctl's host time, writes that need no
 * fault go on while faults wait for the lock, and a guest that never stops
 * gets some of its pages reported one collection later, none lost.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { neverStoppingGuest } from "../../../clients/calibrate/race.js";
import { ClockDrive, MemslotFlag, WorkloadPattern } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { GiB, startHypervisor, type RunningHypervisor } from "../../../tests/hypervisor-harness.js";
import { rejects } from "../../../tests/grpc-assert.js";
import { status } from "@grpc/grpc-js";

describe("syncs with the vCPUs running", () => {
  let h: RunningHypervisor;
  before(async () => (h = await startHypervisor()));
  after(() => h.close());
  const race = (vm: string, vcpusRun: boolean, checkNs: number, seed = 7n) =>
    neverStoppingGuest(h.client, { vm, pages: 16384, intervalNs: 10e6, checkNs, iterations: 12, writesPerSecond: 200_000, seed, vcpusRun, pattern: "uniform" });

  test("a GET with the vCPUs running moves the VM's clock by its host time, the guest writing meanwhile; its faults wait for the lock", async () => {
    const c = h.client;
    const slot = { slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(GiB), flags: MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES };
    // Every write goes to 52 hot pages, which stay in the vCPU's TLB; the whole slot is dirty first, so the GET is long.
    await c.createVm({ vm: "run-get", vcpus: 1, memslots: [slot], workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: 1e9 } });
    await c.advanceVm({ vm: "run-get", durationNs: 1_000_000_000n });
    await c.setWorkload({ vm: "run-get", workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_HOT_COLD, writesPerSecond: 1e6, hotFraction: 0.0002, hotWriteFraction: 1 } });
    await c.advanceVm({ vm: "run-get", durationNs: 1_000_000n });
    const before = (await c.getVm({ vm: "run-get" })).vm!;
    const g = await c.getDirtyLog({ vm: "run-get", slot: 0, vcpusRun: true });
    const afterGet = (await c.getVm({ vm: "run-get" })).vm!;
    assert.equal(afterGet.clockNs - before.clockNs, g.hostNs, "the clock moved by the GET's host time");
    const v0 = before.vcpus[0];
    const v1 = afterGet.vcpus[0];
    // 7.9 ms of GET at 1 M writes/s: the hot pages' stale TLB entries take the writes (seed 004's window), no fault.
    assert.ok(v1.writes - v0.writes > 5000n, `the guest wrote ${v1.writes - v0.writes} times during the GET`);
    assert.equal(v1.writeFaults, v0.writeFaults, "no fault inside the GET: it holds the lock, and the TLB entries are stale until its flush");
    await c.advanceVm({ vm: "run-get", durationNs: 1_000_000n });
    assert.ok((await c.getVm({ vm: "run-get" })).vm!.vcpus[0].writeFaults > v1.writeFaults, "after the flush the hot pages fault again");
    const clock = (await c.getVm({ vm: "run-get" })).vm!.clockNs;
    const atomic = await c.getDirtyLog({ vm: "run-get", slot: 0 });
    assert.equal((await c.getVm({ vm: "run-get" })).vm!.clockNs, clock, "without vcpus_run the GET is atomic");
    assert.ok(atomic.dirtyPages > 0n);
  });

  test("a guest that never stops gets pages reported one collection later, none lost; atomically, none", async () => {
    const running = await race("race-run", true, 200_000);
    assert.ok(running.changed > 1000, `${running.changed} pages changed`);
    assert.ok(running.late > 0 && running.lateShare < 0.5, `${running.late} of ${running.changed} late`);
    assert.equal(running.lost, 0);
    const atomic = await race("race-atomic", false, 0);
    assert.equal(atomic.late, 0, "a GET that stops the guest and a read that takes no time leave no page for later");
    assert.equal(atomic.lost, 0);
  });

  test("the race is deterministic for a seed", async () => {
    const a = await race("race-a", true, 200_000, 11n);
    const b = await race("race-b", true, 200_000, 11n);
    assert.deepEqual(a, b);
  });

  test("a sync whose guest run would simulate too many writes is atomic, and says so: one call cannot hold the server", async () => {
    const c = h.client;
    const slot = { slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(GiB), flags: MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES };
    await c.createVm({ vm: "run-big", vcpus: 1, memslots: [slot], workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: 1e9 } });
    await c.advanceVm({ vm: "run-big", durationNs: 1_000_000_000n }); // every page dirty: a GET of 7.9 ms, at 1e9 writes/s 7.9 M writes
    const before = (await c.getVm({ vm: "run-big" })).vm!.clockNs;
    const g = await c.getDirtyLog({ vm: "run-big", slot: 0, vcpusRun: true });
    assert.equal(g.vcpusRan, false);
    assert.equal(g.dirtyPages, BigInt(GiB / 4096));
    assert.equal((await c.getVm({ vm: "run-big" })).vm!.clockNs, before, "atomic: the caller runs the guest for its time");
  });

  test("vcpus_run on a real-time VM is refused with a precise status", async () => {
    const c = h.client;
    await c.createVm({ vm: "run-rt", vcpus: 1, clock: ClockDrive.CLOCK_DRIVE_REALTIME, memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: 1n << 24n, flags: MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES }] });
    await rejects(c.getDirtyLog({ vm: "run-rt", slot: 0, vcpusRun: true }), status.FAILED_PRECONDITION, /vcpus_run: VM run-rt runs on the real-time clock/);
  });
});
