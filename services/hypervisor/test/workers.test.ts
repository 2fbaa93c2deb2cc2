import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { status } from "@grpc/grpc-js";
import { createDemoVm, type GuestSpec } from "../../../clients/migration-controller/demo-vm.js";
import { migrate } from "../../../clients/migration-controller/migrate.js";
import type { MigrationReport } from "../../../clients/migration-controller/types.js";
import { parseMechanism } from "../../../clients/migration-controller/trackers/index.js";
import { Capability, MemslotFlag, Workload, WorkloadPattern } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { GiB, metric, MiB, startDevice, startHypervisor, type RunningHypervisor } from "../../../tests/hypervisor-harness.js";
import { createLogger } from "../../../common/log.js";
import { connectHypervisor } from "../client.js";
import { DEFAULT_COSTS } from "../model/cost-model.js";
import { transferable } from "../shard.js";
import { createShardedHypervisorServer, vmField } from "../shards.js";

const guest = (seed: number): GuestSpec => ({
  memoryBytes: 512 * MiB,
  vcpus: 4,
  arch: "arm64",
  backing: "4k",
  workload: Workload.fromPartial({ pattern: WorkloadPattern.WORKLOAD_PATTERN_HOT_COLD, writesPerSecond: 200_000, hotFraction: 0.1, hotWriteFraction: 0.9 }),
  noisyWritesPerSecond: null,
  vcpuWorkloads: null,
  seed,
  ringEntries: 4096,
});

/** What a seeded migration must reproduce whatever the threading: the memory, the syncs, each round's pages and time. */
const outcome = (r: MigrationReport) => ({
  status: r.status,
  sha256: r.verification?.sourceSha256,
  match: r.verification?.match,
  syncs: r.dirtySyncCount,
  totalTimeMs: r.totalTimeMs,
  downtimeMs: r.downtimeMs,
  rounds: r.rounds.map((x) => [x.dirtyPages, x.pagesSent, x.durationMs]),
});

async function migrateOn(src: RunningHypervisor, dst: RunningHypervisor, names: string[], mechanism = "bitmap") {
  await Promise.all(names.map((n) => createDemoVm(src.client, n, guest(7), parseMechanism(mechanism))));
  return Promise.all(names.map((n) => migrate({ sourceVm: n, destinationVm: n, mechanism: parseMechanism(mechanism).name }, { source: src.client, destination: dst.client })));
}

describe("VMs in worker threads (HYPERVISOR_VM_WORKERS)", () => {
  let inline: [RunningHypervisor, RunningHypervisor];
  let sharded: [RunningHypervisor, RunningHypervisor];
  before(async () => {
    inline = await Promise.all([startHypervisor({ workers: 0 }), startHypervisor({ workers: 0 })]);
    sharded = await Promise.all([startHypervisor({ workers: 2 }), startHypervisor({ workers: 2 })]);
  });
  after(async () => {
    await Promise.all([...inline, ...sharded].map((h) => h.close()));
  });

  test("a seeded migration gives the same memory, syncs and rounds in workers as on the gRPC thread, alone or two at once", async () => {
    const [alone] = await migrateOn(inline[0], inline[1], ["solo"]);
    assert.equal(alone.status, "completed");
    assert.equal(alone.verification?.match, true);
    const [inWorker] = await migrateOn(sharded[0], sharded[1], ["solo"]);
    assert.deepEqual(outcome(inWorker), outcome(alone));
    // Two at once land in different workers and still each run as alone.
    const both = await migrateOn(sharded[0], sharded[1], ["left", "right"]);
    for (const r of both) assert.deepEqual(outcome(r), outcome(alone));
    const { vms } = await sharded[0].client.listVms({});
    assert.deepEqual(vms.map((v) => v.vm), ["solo", "left", "right"], "ListVms gathers every worker's VMs in creation order");
    assert.equal(new Set(vms.map((v) => v.vmid)).size, 3, "VMIDs are unique across the workers");
    for (const n of ["solo", "left", "right"]) await Promise.all(sharded.map((h) => h.client.destroyVm({ vm: n })));
  });

  test("the workers share one memory budget, and a VM's errors are the model's own statuses", async () => {
    const h = await startHypervisor({ workers: 2, memoryBudgetBytes: 64 * MiB });
    try {
      // About 16 bytes per 4 KiB page: 6 GiB of guest takes 24 MiB of state, so two fit in 64 MiB and a third does not, whichever worker it lands in.
      const create = (vm: string) => h.client.createVm({ vm, vcpus: 1, memslots: [{ slot: 0, guestPhysAddr: 0n, memorySize: BigInt(6 * GiB), flags: MemslotFlag.MEMSLOT_FLAG_UNSPECIFIED }] });
      await create("a");
      await create("b");
      await assert.rejects(create("c"), (e: { code: number; details: string }) => e.code === status.RESOURCE_EXHAUSTED && /budget is left/.test(e.details));
      await assert.rejects(create("a"), (e: { code: number; details: string }) => e.code === status.ALREADY_EXISTS && /^a VM named 'a' already exists/.test(e.details));
      await assert.rejects(h.client.getVm({ vm: "nobody" }), (e: { code: number; details: string }) => e.code === status.NOT_FOUND && /^no VM named 'nobody'/.test(e.details));
      await assert.rejects(h.client.getVm({ vm: "" }), (e: { code: number }) => e.code === status.INVALID_ARGUMENT);
      // The destroyed VM's memory is free again, for a VM in either worker.
      await h.client.destroyVm({ vm: "a" });
      await create("c");
      assert.equal(await metric(h.httpPort, /^hypervisor_vms /), 2, "/metrics sums the workers' VMs");
      assert.equal(await metric(h.httpPort, /^hypervisor_memory_budget_bytes /), 64 * MiB, "the budget is the process's, once");
      assert.ok((await metric(h.httpPort, /^grpc_server_handled_total\{.*grpc_method="CreateVm".*grpc_code="OK"/)) >= 3, "RPC metrics come from the router");
    } finally {
      await h.close();
    }
  });

  test("the page-tracking device registers once for every worker: VMs in both are tracked by it and lose no page", async () => {
    const device = await startDevice();
    const [src, dst] = sharded;
    try {
      const { linkId } = await src.client.registerPageTrackingDevice({ address: device.address });
      // The device's heartbeat registers again: the same link, in every worker.
      assert.equal((await src.client.registerPageTrackingDevice({ address: device.address })).linkId, linkId);
      const rs = await migrateOn(src, dst, ["ptd-a", "ptd-b"], "device");
      for (const r of rs) {
        assert.equal(r.status, "completed", r.error ?? "");
        assert.equal(r.verification?.match, true);
        assert.ok(r.tracker.pages_read_from_device > 0, "the device logged writes");
      }
      const check = await src.client.checkExtension({ vm: "", capability: Capability.CAPABILITY_ARM_PAGE_TRACKING_DEVICE });
      assert.equal(check.value, 1n);
      await src.client.unregisterPageTrackingDevice({ address: device.address });
      assert.equal((await src.client.checkExtension({ vm: "ptd-b", capability: Capability.CAPABILITY_ARM_PAGE_TRACKING_DEVICE })).value, 0n, "gone from the second worker too");
      for (const n of ["ptd-a", "ptd-b"]) await Promise.all(sharded.map((h) => h.client.destroyVm({ vm: n })));
    } finally {
      await device.close();
    }
  });

  test("each VM goes to the emptiest worker; a worker that dies takes only its own VMs, and says so", async () => {
    const app = createShardedHypervisorServer({ workers: 2, memoryBudgetBytes: GiB, costs: DEFAULT_COSTS, allowFaultInjection: false, logger: createLogger("hypervisor", "silent"), logLevel: "silent", realtimeTickMs: 0 });
    const { grpcPort, httpPort } = await app.listen({ host: "127.0.0.1", grpcPort: 0, httpPort: 0 });
    const c = connectHypervisor(`127.0.0.1:${grpcPort}`);
    try {
      const slot = { slot: 0, guestPhysAddr: 0n, memorySize: BigInt(64 * MiB), flags: MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES };
      for (const vm of ["a", "b", "c"]) await c.createVm({ vm, vcpus: 1, memslots: [slot] });
      assert.deepEqual(app.shards.map((s) => s.vms), [2, 1]);
      await c.destroyVm({ vm: "a" });
      await c.createVm({ vm: "d", vcpus: 1, memslots: [slot] });
      assert.deepEqual(app.shards.map((s) => s.vms), [2, 1], "d took a's place in worker 0");
      assert.equal((await fetch(`http://127.0.0.1:${httpPort}/healthz`)).status, 200);
      await app.shards[1].worker.terminate();
      await assert.rejects(c.getVm({ vm: "b" }), (e: { code: number; details: string }) => e.code === status.UNAVAILABLE && /VM worker 1 of this hypervisor is gone .*its VMs are lost/.test(e.details));
      assert.equal((await c.getVm({ vm: "c" })).vm?.vm, "c", "the other worker's VMs are served");
      assert.deepEqual((await c.listVms({})).vms.map((v) => v.vm), ["c", "d"]);
      const health = await fetch(`http://127.0.0.1:${httpPort}/healthz`);
      assert.equal(health.status, 503);
      assert.match(JSON.stringify(await health.json()), /worker 1: it exited/);
    } finally {
      c.close();
      await app.close();
    }
  });

  test("a frame moves between threads without a copy only when its memory holds nothing else", () => {
    // As grpc-js reads a large message: one allocation, its 5-byte header first.
    const alone = Buffer.alloc(5 + (1 << 20)).subarray(5);
    const t = transferable(alone);
    assert.equal(t.transfer.length, 1);
    assert.equal(t.frame.byteOffset, 5, "the same view, header skipped");
    // A small message shares Buffer's pool (or a chunk with others): it is copied, and the original stays usable.
    const pooled = Buffer.from("vm-name");
    const c = transferable(pooled);
    assert.equal(c.transfer.length, 0);
    assert.notEqual(c.frame.buffer, pooled.buffer);
    assert.equal(Buffer.from(c.frame).toString(), "vm-name");
  });

  test("a request's VM is read off the wire without decoding the rest, whatever the field order", () => {
    const utf8 = (s: string) => [...Buffer.from(s)];
    // Field 2 (varint), field 3 (fixed64), field 1 (the name): an encoder may put it anywhere.
    assert.equal(vmField(Buffer.from([0x10, 0x96, 0x01, 0x19, 1, 2, 3, 4, 5, 6, 7, 8, 0x0a, 3, ...utf8("vm7")])), "vm7");
    assert.equal(vmField(Buffer.alloc(0)), "");
    assert.throws(() => vmField(Buffer.from([0x10, 0x96])), /ends inside a field/);
  });
});
