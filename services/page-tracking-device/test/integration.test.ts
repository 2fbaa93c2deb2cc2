import assert from "node:assert/strict";
import { status } from "@grpc/grpc-js";
import { after, before, describe, test } from "node:test";
import { spawnService } from "../../../common/spawn.js";
import { Capability, FaultKind, MemslotFlag, WorkloadPattern } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { migrate } from "../../../clients/migration-controller/migrate.js";
import { bit, GiB, metric, MiB, startDevice, startHypervisor, until, type RunningHypervisor } from "../../../tests/hypervisor-harness.js";
import { collectDirtyLog, runSelftest } from "../../../tests/selftest.js";
import { rejects } from "../../../tests/grpc-assert.js";

const DEV = Capability.CAPABILITY_ARM_PAGE_TRACKING_DEVICE;
const BASE = BigInt(GiB);


describe("the hypervisor with a page-tracking device", () => {
  let h: RunningHypervisor;
  before(async () => (h = await startHypervisor()));
  after(() => h.close());
  const c = () => h.client;

  test("registration drives the capability; bad input by status code", async () => {
    assert.equal((await c().checkExtension({ capability: DEV })).value, 0n);
    await c().createVm({ vm: "r", vcpus: 1 });
    await rejects(c().enableCap({ vm: "r", capability: DEV, args: [1n] }), status.FAILED_PRECONDITION, /no page-tracking device is registered/);
    const d = await startDevice();
    try {
      await rejects(c().registerPageTrackingDevice({ address: "nonsense" }), status.INVALID_ARGUMENT, /not host:port/);
      await c().registerPageTrackingDevice({ address: d.address });
      assert.equal((await c().checkExtension({ capability: DEV })).value, 1n);
      await rejects(c().registerPageTrackingDevice({ address: "127.0.0.1:9" }), status.ALREADY_EXISTS, /already registered.*EBUSY/);
      await rejects(c().unregisterPageTrackingDevice({ address: "127.0.0.1:9" }), status.NOT_FOUND, /no device registered/);
      await c().createVm({ vm: "ringed", vcpus: 1, dirtyRing: { capability: Capability.CAPABILITY_DIRTY_LOG_RING_ACQ_REL, bytes: 65536n } });
      await rejects(c().enableCap({ vm: "ringed", capability: DEV, args: [1n] }), status.FAILED_PRECONDITION, /dirty ring/);
      await rejects(c().enableCap({ vm: "r", capability: DEV, args: [3n] }), status.INVALID_ARGUMENT, /args\[0\]/);
      await c().unregisterPageTrackingDevice({ address: d.address });
      assert.equal((await c().checkExtension({ capability: DEV })).value, 0n);
    } finally {
      await d.close();
    }
  });

  test("selftest invariant with the device: first writes fault and are logged by KVM, later ones by the device", async () => {
    const d = await startDevice();
    try {
      await c().registerPageTrackingDevice({ address: d.address });
      let faults = 0n;
      let hwUpdates = 0n;
      const r = await runSelftest(c(), {
        vm: "st-dev",
        collect: async (cl, vm, slot, n) => {
          const info = (await cl.getVm({ vm })).vm!;
          faults = info.vcpus[0].writeFaults;
          hwUpdates = info.hardwareDirtyUpdates;
          return collectDirtyLog(cl, vm, slot, n);
        },
        beforeLogging: (cl, vm) => cl.enableCap({ vm, capability: DEV, args: [1n] }).then(() => undefined),
        // A small working set, so that later iterations rewrite pages first faulted in earlier ones.
        writesPerSecond: 2e6,
      });
      assert.deepEqual([r.falseDirty, r.lost], [0, 0]);
      assert.ok(faults > 0n, "first writes fault");
      assert.ok(hwUpdates > 0n, "later writes complete without a fault");
      const sent = await metric(h.httpPort, /^hypervisor_page_tracking_device_gpas_sent_total/);
      assert.equal(BigInt(sent), hwUpdates, "every fault-free write reached the device");
    } finally {
      await c().unregisterPageTrackingDevice({ address: d.address }).catch(() => undefined);
      await d.close();
    }
  });

  test("the injected bug of a sync that does not wait for the last sequence number loses pages, and the invariant catches it", async () => {
    const d = await startDevice();
    try {
      await c().registerPageTrackingDevice({ address: d.address });
      const r = await runSelftest(c(), {
        vm: "st-dev-nowait",
        collect: collectDirtyLog,
        beforeLogging: (cl, vm) => cl.enableCap({ vm, capability: DEV, args: [1n] }).then(() => undefined),
        writesPerSecond: 2e6,
        inject: { skipDeviceSyncWait: true },
      });
      assert.ok(r.lost > 0, `pages written just before a GET reached the device after its read (${r.lost} lost)`);
    } finally {
      await c().unregisterPageTrackingDevice({ address: d.address }).catch(() => undefined);
      await d.close();
    }
  });

  test("a device that dies: every tracked page dirty, capability dropped, writes fault again, nothing lost", async () => {
    const d = await startDevice();
    await c().registerPageTrackingDevice({ address: d.address });
    const slot = { slot: 0, guestPhysAddr: BASE, memorySize: BigInt(MiB), flags: MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES };
    await c().createVm({ vm: "dies", vcpus: 1 });
    await c().enableCap({ vm: "dies", capability: DEV, args: [1n] });
    await c().setUserMemoryRegion({ vm: "dies", memslot: slot });
    const w = (page: bigint, value: bigint) => c().guestWrite({ vm: "dies", writes: [{ vcpu: 0, gpa: BASE + page * 4096n, value }] }).then((r) => r.results[0]);
    assert.equal((await w(1n, 1n)).fault, FaultKind.FAULT_KIND_TRANSLATION);
    assert.equal(bit((await c().getDirtyLog({ vm: "dies", slot: 0 })).bitmap, 1), 1);
    const later = await w(1n, 2n);
    assert.deepEqual([later.fault, later.logged], [FaultKind.FAULT_KIND_UNSPECIFIED, false], "the device's to log");
    const g = await c().getDirtyLog({ vm: "dies", slot: 0 });
    assert.deepEqual([bit(g.bitmap, 1), g.pagesSynced], [1, 1n], "read back from the device");
    await w(1n, 3n);
    await d.close(); // the device goes away with that write unreported
    const all = await c().getDirtyLog({ vm: "dies", slot: 0 });
    assert.equal(all.dirtyPages, 256n, "every page of the tracked slot is dirty");
    assert.equal((await c().checkExtension({ capability: DEV })).value, 0n);
    assert.equal(await metric(h.httpPort, /^hypervisor_page_tracking_device_lost_total/), 1);
    const after = await w(1n, 4n);
    assert.deepEqual([after.fault, after.logged], [FaultKind.FAULT_KIND_PERMISSION, true], "back to write protection");
    const info = (await c().getVm({ vm: "dies" })).vm!;
    assert.equal(info.pageTrackingDevice, false);
    await c().unregisterPageTrackingDevice({ address: d.address }).catch(() => undefined);
  });

  test("a device migration verifies, and still verifies when the device process is killed or stopped (SIGSTOP) mid-migration", async () => {
    const dst = await startHypervisor();
    try {
      for (const fault of ["none", "SIGKILL", "SIGSTOP"] as const) {
        const kill = fault !== "none";
        const dev = await spawnService("services/page-tracking-device/main.ts", {
          PTDEVICE_GRPC_PORT: "0",
          PTDEVICE_HTTP_PORT: "0",
          PTDEVICE_ANNOUNCE: "1",
          PTDEVICE_HYPERVISOR: h.address,
        });
        const vm = `mig-${fault}`;
        await c().createVm({
          vm,
          vcpus: 2,
          memslots: [{ slot: 0, guestPhysAddr: BASE, memorySize: BigInt(128 * MiB) }],
          workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: 1e8 },
        });
        await c().advanceVm({ vm, durationNs: 200_000_000n });
        await c().setWorkload({ vm, workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_HOT_COLD, writesPerSecond: 100_000, hotFraction: 0.05 } });
        const r = await migrate(
          { sourceVm: vm, destinationVm: vm, mechanism: "device", bandwidthBitsPerSecond: 1e9, downtimeLimitMs: 1000 },
          {
            source: c(),
            destination: dst.client,
            onProgress: (e) => {
              if (kill && e.phase === "round" && e.round === 1) dev.proc.kill(fault);
            },
          },
        );
        assert.equal(r.verification?.match, true, fault);
        if (kill) {
          assert.equal(await metric(h.httpPort, /^hypervisor_page_tracking_device_lost_total/), fault === "SIGKILL" ? 2 : 3);
          // A stopped device that comes back re-registers by itself (a new link), and is then unregistered on SIGTERM.
          if (fault === "SIGSTOP") {
            dev.proc.kill("SIGCONT");
            await until(async () => (await c().checkExtension({ capability: DEV })).value === 1n);
            await dev.stop();
          }
        } else {
          assert.ok(r.tracker.pages_read_from_device > 0);
          await dev.stop();
        }
      }
    } finally {
      await dst.close();
    }
  });
});
