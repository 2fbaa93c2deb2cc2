import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { Arch, Capability, WorkloadPattern } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { GiB, MiB, startDevice, startHypervisor, type RunningHypervisor } from "../../../tests/hypervisor-harness.js";
import { NORMAL_PAGE_BYTES } from "../link.js";
import { migrate, MigrationError } from "../migrate.js";
import { allMechanisms } from "../trackers/index.js";

/** A running VM whose memory is all written once, then a workload. */
async function createVm(h: RunningHypervisor, vm: string, opts: { bytes: number; vcpus: number; workload: object; populate?: boolean; ringEntries?: number; pml?: boolean }) {
  await h.client.createVm({
    vm,
    ...(opts.pml ? { arch: Arch.ARCH_X86_64, pml: true } : {}),
    vcpus: opts.vcpus,
    seed: 11n,
    dirtyRing: opts.ringEntries ? { capability: Capability.CAPABILITY_DIRTY_LOG_RING_ACQ_REL, bytes: BigInt(opts.ringEntries * 16), withBitmap: true } : undefined,
    memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(opts.bytes) }],
    workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: 1e8 },
  });
  if (opts.populate !== false) {
    const pages = opts.bytes / 4096 / opts.vcpus;
    await h.client.advanceVm({ vm, durationNs: BigInt(Math.ceil(pages * 2500)) });
  }
  await h.client.setWorkload({ vm, workload: opts.workload });
}

describe("migration controller", () => {
  let src: RunningHypervisor;
  let dst: RunningHypervisor;
  let device: Awaited<ReturnType<typeof startDevice>>;
  before(async () => {
    src = await startHypervisor();
    dst = await startHypervisor();
    device = await startDevice();
    await src.client.registerPageTrackingDevice({ address: device.address });
  });
  after(async () => {
    await src.close();
    await dst.close();
    await device.close();
  });
  const ends = () => ({ source: src.client, destination: dst.client });

  test("a stepped migration's GETs let the guest run through them: the source's clock moves by the migration's guest time, counted once", async () => {
    const vm = "ran-through";
    await createVm(src, vm, { bytes: 256 * MiB, vcpus: 2, workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_HOT_COLD, writesPerSecond: 100_000, hotFraction: 0.02, hotWriteFraction: 0.95 } });
    const before = (await src.client.getVm({ vm })).vm!.clockNs;
    const r = await migrate({ sourceVm: vm, destinationVm: vm, mechanism: "bitmap", bandwidthBitsPerSecond: 1e9, downtimeLimitMs: 100 }, ends());
    assert.equal(r.status, "completed");
    const after = (await src.client.getVm({ vm })).vm!.clockNs;
    // Every round's GET ran with vcpus_run; had its host time been elapsed again, the clock would be ahead of the report.
    assert.ok(r.rounds.slice(1, -1).every((x) => x.syncHostMs > 0), JSON.stringify(r.rounds.map((x) => x.syncHostMs)));
    assert.ok(Math.abs(Number(after - before) / 1e6 - r.totalTimeMs) < 1, `clock moved ${Number(after - before) / 1e6} ms, total time ${r.totalTimeMs} ms`);
  });

  for (const { name: mechanism, assist } of allMechanisms()) {
    test(`${mechanism}: a converging hot/cold workload migrates and verifies`, async () => {
      const vm = `conv-${mechanism.replaceAll("+", "-")}`;
      await createVm(src, vm, {
        bytes: 256 * MiB,
        vcpus: 2,
        workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_HOT_COLD, writesPerSecond: 100_000, hotFraction: 0.02, hotWriteFraction: 0.95 },
        ringEntries: mechanism.startsWith("ring") ? 65536 : undefined,
        pml: assist === "pml",
      });
      const r = await migrate({ sourceVm: vm, destinationVm: vm, mechanism, bandwidthBitsPerSecond: 1e9, downtimeLimitMs: 100 }, ends());
      assert.equal(r.status, "completed");
      assert.equal(r.verification?.match, true);
      assert.ok(r.downtimeMs! > 0 && r.downtimeMs! < 100 * 1.5, `downtime ${r.downtimeMs} ms`);
      assert.ok(r.rounds.length >= 2);
      assert.equal(r.rounds[0].pagesSent, 65536);
      assert.ok(r.rounds.at(-1)!.stopAndCopy);
      // The destination runs; the source stays paused (QEMU's postmigrate) and no longer logs.
      const d = (await dst.client.getVm({ vm })).vm!;
      assert.ok(d.vcpus.every((v) => !v.paused));
      const s = (await src.client.getVm({ vm })).vm!;
      assert.ok(s.vcpus.every((v) => v.paused));
      assert.ok(s.memslots.every((m) => !m.logging));
      assert.equal(s.manualDirtyLogProtect, 0n, "the manual-protect capability is restored");
    });
  }

  test("the verification catches Firecracker's multi-slot bug: a slot's pages written one page off when its last page is clean", async () => {
    for (const injectSlotOffsetBug of [false, true]) {
      const vm = `multi-${injectSlotOffsetBug}`;
      await src.client.createVm({
        vm,
        vcpus: 1,
        memslots: [
          { slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(16 * MiB) },
          { slot: 1, guestPhysAddr: BigInt(2 * GiB), memorySize: BigInt(16 * MiB) },
        ],
        // Every page but the very last of slot 1: that slot's last page stays clean after round 0.
        workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, writesPerSecond: 200_000, workingSetFirstPage: 0n, workingSetPages: 8191n },
      });
      await src.client.advanceVm({ vm, durationNs: 100_000_000n });
      const run = migrate({ sourceVm: vm, destinationVm: vm, injectSlotOffsetBug, bandwidthBitsPerSecond: 1e9 }, ends());
      if (!injectSlotOffsetBug) assert.equal((await run).verification?.match, true);
      else await assert.rejects(run, (e: MigrationError) => e.kind === "verification" && /dirty pages were lost/.test(e.message));
    }
  });

  test("a GET that fails after consuming the bits fails the migration cleanly: the controller never retries a destructive GET", async () => {
    await createVm(src, "getfail", { bytes: 64 * MiB, vcpus: 1, workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, writesPerSecond: 50_000 } });
    await src.client.setFaultInjection({ vm: "getfail", failEveryOtherGetCopy: true });
    await assert.rejects(migrate({ sourceVm: "getfail", destinationVm: "getfail" }, ends()), (e: MigrationError) => {
      assert.match(e.message, /copying the bitmap of slot 0 out failed after it was cleared.*EFAULT/);
      assert.deepEqual([e.report?.cleanup?.sourceRunning, e.report?.cleanup?.sourceLogging, e.report?.cleanup?.destinationRemoved], [true, false, true]);
      return true;
    });
  });

  test("a mechanism the VM cannot run is refused before anything changes: the architecture, PML present or not", async () => {
    await createVm(src, "x86-pml", { bytes: 16 * MiB, vcpus: 1, workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_IDLE }, pml: true });
    await createVm(src, "arm", { bytes: 16 * MiB, vcpus: 1, workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_IDLE } });
    for (const [vm, mechanism, re] of [
      ["x86-pml", "bitmap", /logs with Intel PML \(the host's enable_pml\): use bitmap\+pml/],
      ["x86-pml", "dbm", /mechanism bitmap\+dbm needs an arm64 VM; 'x86-pml' is x86_64/],
      ["arm", "bitmap+pml", /mechanism bitmap\+pml needs an x86_64 VM; 'arm' is arm64/],
    ] as const) {
      await assert.rejects(migrate({ sourceVm: vm, destinationVm: `${vm}-d`, mechanism }, ends()), (e: MigrationError) => e.kind === "precondition" && re.test(e.message));
      assert.ok((await src.client.getVm({ vm })).vm!.memslots.every((m) => !m.logging));
      await assert.rejects(dst.client.getVm({ vm: `${vm}-d` }));
    }
  });

  test("switchover happens at the round QEMU's rule predicts (sequential workload, dirty pages halve each round)", async () => {
    const pages = 65536;
    const bandwidth = 1e9; // bits/s
    const linkPagesPerSecond = bandwidth / 8 / NORMAL_PAGE_BYTES;
    const rate = linkPagesPerSecond / 2;
    await createVm(src, "rule", { bytes: pages * 4096, vcpus: 1, workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: rate } });
    const r = await migrate({ sourceVm: "rule", destinationVm: "rule", bandwidthBitsPerSecond: bandwidth, latencyNs: 0, downtimeLimitMs: 300 }, ends());
    // Each write while logging is a first write to its page and takes a fault, which slows the guest.
    const effective = 1 / (1 / rate + 2430e-9);
    const ratio = effective / linkPagesPerSecond;
    const threshold = (bandwidth / 8) * 0.3;
    let expected = 1;
    while (pages * ratio ** expected * 4096 > threshold) expected++;
    assert.equal(r.switchover?.round, expected, JSON.stringify(r.rounds.map((x) => x.dirtyPages)));
    for (let i = 1; i <= expected; i++) {
      const predicted = pages * ratio ** i;
      const seen = r.rounds[i].dirtyPages;
      assert.ok(Math.abs(seen - predicted) / predicted < 0.02, `sync ${i}: ${seen} dirty pages, the model predicts ${predicted.toFixed(0)}`);
    }
    for (const x of r.rounds.slice(1, -1)) assert.ok(x.remainingBytes > threshold, "no earlier sync fitted the threshold");
    assert.ok(r.switchover!.remainingBytes <= threshold);
    assert.equal(r.expectedDowntimeMs, r.switchover!.remainingBytes / (bandwidth / 8 / 1000));
  });

  test("a first pass longer than the progress timeout is progress (QEMU's remaining falls as pages go), not a stall", async () => {
    // 256 MiB over 100 Mbit/s: round 0 takes about 21 s of guest time, seven times the timeout.
    await createVm(src, "slow-link", { bytes: 256 * MiB, vcpus: 1, workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_IDLE } });
    const r = await migrate({ sourceVm: "slow-link", destinationVm: "slow-link", bandwidthBitsPerSecond: 1e8, progressTimeoutS: 3, completionTimeoutPerGiBS: 1e4 }, ends());
    assert.equal(r.status, "completed");
    assert.ok(r.rounds[0].durationMs > 3 * 3000, `round 0 took ${r.rounds[0].durationMs} ms of guest time`);
    assert.equal(r.verification?.match, true);
  });

  test("a workload dirtying faster than the link fails cleanly on the completion timeout, not the progress one (each pass moves); the source keeps running", async () => {
    await createVm(src, "hot", {
      bytes: 64 * MiB,
      vcpus: 4,
      workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, writesPerSecond: 50_000 },
    });
    await assert.rejects(
      // 100 s per GiB: 6.25 s for 64 MiB, twice the progress timeout.
      migrate({ sourceVm: "hot", destinationVm: "hot", bandwidthBitsPerSecond: 1e8, progressTimeoutS: 3, completionTimeoutPerGiBS: 100 }, ends()),
      (e: MigrationError) => {
        assert.equal(e.kind, "not-converged");
        assert.match(e.message, /did not converge: 6\.\d s reached the completion timeout of 100 s per GiB/);
        assert.equal(e.report?.status, "failed");
        return true;
      },
    );
    const s = (await src.client.getVm({ vm: "hot" })).vm!;
    assert.ok(s.vcpus.every((v) => !v.paused), "source running");
    assert.ok(s.memslots.every((m) => !m.logging), "source no longer logging");
    await assert.rejects(dst.client.getVm({ vm: "hot" }), /no VM named/);
    const before = Number(s.clockNs);
    await src.client.advanceVm({ vm: "hot", durationNs: 1_000_000n });
    assert.ok((await src.client.getVm({ vm: "hot" })).vm!.vcpus[0].writes > 0n);
    assert.ok(before > 0);
  });

  test("the completion timeout per GiB also ends a migration that does not converge", async () => {
    await createVm(src, "slow", { bytes: 64 * MiB, vcpus: 4, workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, writesPerSecond: 50_000 } });
    await assert.rejects(
      migrate({ sourceVm: "slow", destinationVm: "slow", bandwidthBitsPerSecond: 1e8, completionTimeoutPerGiBS: 100 }, ends()),
      /completion timeout of 100 s per GiB \(6\.3 s for 0\.06 GiB\)/,
    );
  });

  test("skipping the TLB flush loses dirty pages and the verification catches it", async () => {
    await createVm(src, "noflush", {
      bytes: 64 * MiB,
      vcpus: 2,
      workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_HOT_COLD, writesPerSecond: 200_000, hotFraction: 0.005, hotWriteFraction: 0.99 },
    });
    await src.client.setFaultInjection({ vm: "noflush", skipTlbFlushAfterWriteProtect: true });
    await assert.rejects(migrate({ sourceVm: "noflush", destinationVm: "noflush" }, ends()), (e: MigrationError) => {
      assert.equal(e.kind, "verification");
      assert.match(e.message, /differs from the source's .*dirty pages were lost/);
      assert.equal(e.report?.verification?.match, false);
      return true;
    });
    const s = (await src.client.getVm({ vm: "noflush" })).vm!;
    assert.ok(s.vcpus.every((v) => !v.paused), "the source is resumed after a failed verification");
  });

  test("the max-rounds cap forces the switchover (Xen-style) and says so", async () => {
    await createVm(src, "capped", { bytes: 64 * MiB, vcpus: 4, workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, writesPerSecond: 50_000 } });
    const r = await migrate({ sourceVm: "capped", destinationVm: "capped", bandwidthBitsPerSecond: 1e8, maxRounds: 3, completionTimeoutPerGiBS: 1e4 }, ends());
    assert.deepEqual([r.switchover?.round, r.switchover?.forced, r.verification?.match], [3, true, true]);
    assert.ok(r.downtimeMs! > 300, "a forced switchover overshoots the downtime limit");
  });

  test("ring: full rings stall the vCPUs, which shows in the report as exits, stall time and a slower guest", async () => {
    const workload = { pattern: WorkloadPattern.WORKLOAD_PATTERN_HOT_COLD, writesPerSecond: 100_000, hotFraction: 0.05 };
    await createVm(src, "small-ring", { bytes: 256 * MiB, vcpus: 2, workload, ringEntries: 4096 });
    await createVm(src, "big-ring", { bytes: 256 * MiB, vcpus: 2, workload, ringEntries: 65536 });
    const cfg = { mechanism: "ring" as const, bandwidthBitsPerSecond: 1e9, downtimeLimitMs: 1000 };
    const small = await migrate({ ...cfg, sourceVm: "small-ring", destinationVm: "small-ring" }, ends());
    const big = await migrate({ ...cfg, sourceVm: "big-ring", destinationVm: "big-ring" }, ends());
    for (const r of [small, big]) assert.equal(r.verification?.match, true);
    const r0 = (r: typeof small) => r.rounds[0];
    assert.ok(r0(small).ringFullExits > 0 && r0(small).ringStallMs > 0, JSON.stringify(r0(small)));
    assert.equal(r0(big).ringFullExits, 0);
    assert.ok(r0(small).guestWritesPerSecond < r0(big).guestWritesPerSecond, `${r0(small).guestWritesPerSecond} vs ${r0(big).guestWritesPerSecond}`);
    assert.ok(small.tracker.reaps_on_ring_full > 0);
    const s = (await src.client.getVm({ vm: "small-ring" })).vm!;
    assert.ok(s.vcpus.every((v) => v.dirtyRingEntries === 0), "the rings are drained at the end");
  });

  test("ring: a VM created without a ring is refused with the reason", async () => {
    await createVm(src, "no-ring", { bytes: 4 * MiB, vcpus: 1, workload: {}, populate: false });
    await assert.rejects(migrate({ sourceVm: "no-ring", destinationVm: "no-ring", mechanism: "ring" }, ends()), (e: MigrationError) => {
      assert.equal(e.kind, "precondition");
      assert.match(e.message, /has no dirty ring; KVM only enables rings before vCPUs exist/);
      return true;
    });
    await assert.rejects(dst.client.getVm({ vm: "no-ring" }), /no VM named/, "the destination is removed");
  });

  test("preconditions: unknown VM, paused source, slot already logging, destination exists", async () => {
    await assert.rejects(migrate({ sourceVm: "ghost", destinationVm: "g" }, ends()), (e: MigrationError) => e.kind === "not-found" && /no VM named 'ghost'/.test(e.message));
    await createVm(src, "busy", { bytes: 4 * MiB, vcpus: 1, workload: {}, populate: false });
    await src.client.pauseVm({ vm: "busy" });
    await assert.rejects(migrate({ sourceVm: "busy", destinationVm: "busy" }, ends()), /is paused/);
    await src.client.resumeVm({ vm: "busy" });
    await src.client.setUserMemoryRegion({ vm: "busy", memslot: { slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(4 * MiB), flags: 1 } });
    await assert.rejects(migrate({ sourceVm: "busy", destinationVm: "busy" }, ends()), /already logging dirty pages/);
    await src.client.setUserMemoryRegion({ vm: "busy", memslot: { slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(4 * MiB), flags: 0 } });
    await dst.client.createVm({ vm: "taken", vcpus: 1 });
    await assert.rejects(migrate({ sourceVm: "busy", destinationVm: "taken" }, ends()), (e: MigrationError) => e.kind === "precondition" && /already exists/.test(e.message));
    assert.ok((await dst.client.getVm({ vm: "taken" })).vm, "an existing destination VM is never touched");
    await assert.rejects(migrate({ sourceVm: "busy", destinationVm: "x", bandwidthBitsPerSecond: 0 }, ends()), (e: MigrationError) => e.kind === "usage");
  });
});
