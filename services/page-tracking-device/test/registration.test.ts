/**
 * The page-tracking device and its hypervisor survive each other: a device
 * re-registers with a hypervisor that restarted and releases the trackers
 * the old one held; registration is refused unless a device answers at the
 * address; the device's refusals reach clients named as the device's.
 */
import assert from "node:assert/strict";
import { status } from "@grpc/grpc-js";
import { describe, test } from "node:test";
import { spawnService } from "../../../common/spawn.js";
import { Capability, MemslotFlag, WorkloadPattern } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { connectHypervisor } from "../../hypervisor/client.js";
import { migrate } from "../../../clients/migration-controller/migrate.js";
import { freePort, GiB, metric, MiB, startDevice, startHypervisor, until } from "../../../tests/hypervisor-harness.js";
import { rejects } from "../../../tests/grpc-assert.js";

const DEV = Capability.CAPABILITY_ARM_PAGE_TRACKING_DEVICE;
const slot = { slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(16 * MiB), flags: MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES };

describe("the device and its hypervisor survive each other", () => {
  test("a hypervisor restart: the device re-registers by itself and releases the old hypervisor's trackers", async () => {
    const port = await freePort();
    const hvEnv = { HYPERVISOR_GRPC_PORT: String(port), HYPERVISOR_HTTP_PORT: "0", HYPERVISOR_ANNOUNCE: "1" };
    let hv = await spawnService("services/hypervisor/main.ts", hvEnv);
    const dev = await spawnService("services/page-tracking-device/main.ts", {
      PTDEVICE_GRPC_PORT: "0",
      PTDEVICE_HTTP_PORT: "0",
      PTDEVICE_ANNOUNCE: "1",
      PTDEVICE_HYPERVISOR: hv.address,
      PTDEVICE_HEARTBEAT_MS: "200",
    });
    const c = connectHypervisor(hv.address);
    try {
      await c.createVm({ vm: "a", vcpus: 1, memslots: [slot] });
      await c.enableCap({ vm: "a", capability: DEV, args: [1n] });
      assert.equal(await metric(dev.httpPort, /^ptdevice_trackers /), 1);
      hv.proc.kill("SIGKILL");
      await hv.stop();
      hv = await spawnService("services/hypervisor/main.ts", hvEnv);
      // The new hypervisor knows no device until the device's heartbeat finds it.
      await until(async () => (await c.checkExtension({ capability: DEV }).catch(() => ({ value: 0n }))).value === 1n, "the device to re-register");
      // The device releases them once its registration's answer arrives, just after the hypervisor advertises the capability.
      await until(async () => (await metric(dev.httpPort, /^ptdevice_orphan_trackers_released_total /)) === 1, "the old trackers to be released");
      assert.equal(await metric(dev.httpPort, /^ptdevice_trackers /), 0);
      // VMID 1 again, as the restarted hypervisor numbers its VMs from 1: the device takes it, and a migration verifies.
      await c.createVm({ vm: "b", vcpus: 1, memslots: [{ ...slot, flags: 0 }], workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, writesPerSecond: 50_000 } });
      await c.advanceVm({ vm: "b", durationNs: 50_000_000n });
      const r = await migrate({ sourceVm: "b", destinationVm: "b2", mechanism: "device" }, { source: c, destination: c });
      assert.equal(r.verification?.match, true);
    } finally {
      c.close();
      await dev.stop();
      await hv.stop();
    }
  });

  test("registration is refused unless a page-tracking device answers at a valid address", async () => {
    const h = await startHypervisor();
    try {
      const c = h.client;
      await rejects(c.registerPageTrackingDevice({ address: "127.0.0.1:0" }), status.INVALID_ARGUMENT, /not host:port with a port in \[1, 65535\].*EINVAL/);
      await rejects(c.registerPageTrackingDevice({ address: "127.0.0.1:99999" }), status.INVALID_ARGUMENT, /port in \[1, 65535\]/);
      const closed = await freePort();
      await rejects(c.registerPageTrackingDevice({ address: `127.0.0.1:${closed}` }), status.FAILED_PRECONDITION, new RegExp(`no page-tracking device answers at 127.0.0.1:${closed}.*ENODEV`));
      // A hypervisor is a gRPC server too, but not a device.
      await rejects(c.registerPageTrackingDevice({ address: h.address }), status.FAILED_PRECONDITION, /does not serve dirtytrack\.ptdevice\.v1\.PageTrackingDeviceService/);
      assert.equal((await c.checkExtension({ capability: DEV })).value, 0n, "nothing unreachable is advertised");
    } finally {
      await h.close();
    }
  });

  test("the device's refusals and silences reach clients as the hypervisor's status, naming the device", async () => {
    const h = await startHypervisor();
    const d = await startDevice({ maxTrackers: 1 });
    try {
      const c = h.client;
      await c.registerPageTrackingDevice({ address: d.address });
      for (const vm of ["one", "two"]) await c.createVm({ vm, vcpus: 1, memslots: [slot] });
      await c.enableCap({ vm: "one", capability: DEV, args: [1n] });
      await rejects(
        c.enableCap({ vm: "two", capability: DEV, args: [1n] }),
        status.RESOURCE_EXHAUSTED,
        new RegExp(`VM two: the page-tracking device at ${d.address} refused: allocate_tracker: the device holds 1 trackers.*ENOSPC`),
      );
      await c.unregisterPageTrackingDevice({ address: d.address });

      const stopped = await spawnService("services/page-tracking-device/main.ts", { PTDEVICE_GRPC_PORT: "0", PTDEVICE_HTTP_PORT: "0", PTDEVICE_ANNOUNCE: "1" });
      try {
        await c.registerPageTrackingDevice({ address: stopped.address });
        stopped.proc.kill("SIGSTOP");
        await rejects(c.enableCap({ vm: "two", capability: DEV, args: [1n] }), status.FAILED_PRECONDITION, new RegExp(`the page-tracking device at ${stopped.address} did not answer.*ENODEV`));
      } finally {
        stopped.proc.kill("SIGCONT");
        await stopped.stop();
      }
    } finally {
      await d.close();
      await h.close();
    }
  });
});
