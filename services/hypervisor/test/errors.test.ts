import assert from "node:assert/strict";
import { status } from "@grpc/grpc-js";
import { after, before, describe, test } from "node:test";
import { Capability, ClockDrive, MemslotFlag, WorkloadPattern } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { GiB, MiB, startHypervisor, type RunningHypervisor } from "../../../tests/hypervisor-harness.js";
import { rejects } from "../../../tests/grpc-assert.js";

const LOG = MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES;


describe("bad input gets a precise status and KVM's errno, never UNKNOWN", () => {
  let h: RunningHypervisor;
  let noInjection: RunningHypervisor;
  before(async () => {
    h = await startHypervisor({ memoryBudgetBytes: 4 * GiB });
    noInjection = await startHypervisor({ allowFaultInjection: false });
    await h.client.createVm({
      vm: "e",
      vcpus: 2,
      memslots: [
        { slot: 1, guestPhysAddr: BigInt(GiB), memorySize: BigInt(64 * MiB), flags: LOG },
        { slot: 2, guestPhysAddr: BigInt(2 * GiB), memorySize: BigInt(MiB) },
        { slot: 3, guestPhysAddr: BigInt(3 * GiB), memorySize: BigInt(MiB), flags: MemslotFlag.MEMSLOT_FLAG_READONLY },
      ],
    });
  });
  after(async () => {
    await h.close();
    await noInjection.close();
  });

  const c = () => h.client;

  test("INVALID_ARGUMENT", async () => {
    await rejects(c().getDirtyLog({ vm: "e", slot: 1 << 16 }), status.INVALID_ARGUMENT, /address space 1.*EINVAL/);
    await rejects(c().getDirtyLog({ vm: "e", slot: 40000 }), status.INVALID_ARGUMENT, /KVM_USER_MEM_SLOTS.*EINVAL/);
    const bm = Buffer.alloc(8);
    await rejects(c().clearDirtyLog({ vm: "e", slot: 1, firstPage: 3n, numPages: 64, bitmap: bm }), status.INVALID_ARGUMENT, /first_page 3.*EINVAL/);
    await rejects(c().clearDirtyLog({ vm: "e", slot: 1, firstPage: 0n, numPages: 65, bitmap: Buffer.alloc(16) }), status.INVALID_ARGUMENT, /multiple of 64.*EINVAL/);
    await rejects(c().clearDirtyLog({ vm: "e", slot: 1, firstPage: 16384n, numPages: 64, bitmap: bm }), status.INVALID_ARGUMENT, /run past.*EINVAL/);
    await rejects(c().clearDirtyLog({ vm: "e", slot: 1, firstPage: 0n, numPages: 128, bitmap: bm }), status.INVALID_ARGUMENT, /need 16.*EFAULT/);
    await rejects(c().guestWrite({ vm: "e", writes: [{ vcpu: 0, gpa: 5n }] }), status.INVALID_ARGUMENT, /outside every memslot/);
    await rejects(c().guestWrite({ vm: "e", writes: [{ vcpu: 9, gpa: BigInt(GiB) }] }), status.INVALID_ARGUMENT, /no vCPU 9/);
    await rejects(c().createVm({ vm: "z", vcpus: 0 }), status.INVALID_ARGUMENT, /vcpus 0.*EINVAL/);
    await rejects(c().createVm({ vm: "bad name!", vcpus: 1 }), status.INVALID_ARGUMENT, /name/);
    const slot = (m: object) => c().setUserMemoryRegion({ vm: "e", memslot: { slot: 9, ...m } });
    await rejects(slot({ guestPhysAddr: 100n, memorySize: 4096n }), status.INVALID_ARGUMENT, /not 4 KiB aligned.*EINVAL/);
    await rejects(slot({ guestPhysAddr: 0n, memorySize: 1000n }), status.INVALID_ARGUMENT, /multiple of 4 KiB.*EINVAL/);
    await rejects(slot({ guestPhysAddr: 1n << 40n, memorySize: 4096n }), status.INVALID_ARGUMENT, /40-bit IPA.*EFAULT/);
    await rejects(slot({ guestPhysAddr: 0n, memorySize: 1n << 44n }), status.INVALID_ARGUMENT, /KVM_MEM_MAX_NR_PAGES.*EINVAL/);
    await rejects(slot({ guestPhysAddr: BigInt(GiB + MiB), memorySize: BigInt(MiB) }), status.INVALID_ARGUMENT, /overlaps slot 1.*EEXIST/);
    await rejects(slot({ guestPhysAddr: 0n, memorySize: 4096n, flags: 4 }), status.INVALID_ARGUMENT, /unknown flags.*EINVAL/);
    await rejects(c().setUserMemoryRegion({ vm: "e", memslot: { slot: 2, guestPhysAddr: BigInt(2 * GiB), memorySize: BigInt(2 * MiB) } }), status.INVALID_ARGUMENT, /cannot change size/);
    await rejects(c().setUserMemoryRegion({ vm: "e", memslot: { slot: 3, guestPhysAddr: BigInt(3 * GiB), memorySize: BigInt(MiB) } }), status.INVALID_ARGUMENT, /READONLY/);
    await rejects(c().enableCap({ vm: "e", capability: Capability.CAPABILITY_MANUAL_DIRTY_LOG_PROTECT2, args: [2n] }), status.INVALID_ARGUMENT, /INITIALLY_SET requires MANUAL_PROTECT_ENABLE.*EINVAL/);
    await rejects(c().enableCap({ vm: "e", capability: Capability.CAPABILITY_MANUAL_DIRTY_LOG_PROTECT2, args: [8n] }), status.INVALID_ARGUMENT, /unknown bits.*EINVAL/);
    await rejects(c().enableCap({ vm: "e", capability: 999 as Capability }), status.INVALID_ARGUMENT, /not supported.*EINVAL/);
    await rejects(c().advanceVm({ vm: "e", durationNs: 0n }), status.INVALID_ARGUMENT, /duration_ns/);
    await rejects(c().advanceVm({ vm: "e", durationNs: 1n << 60n }), status.INVALID_ARGUMENT, /duration_ns/);
    await rejects(c().setWorkload({ vm: "e", workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, writesPerSecond: Number.NaN } }), status.INVALID_ARGUMENT, /writes_per_second/);
    await rejects(c().setWorkload({ vm: "e", workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, workingSetFirstPage: 1n << 40n } }), status.INVALID_ARGUMENT, /runs past/);
    await rejects(c().readMemory({ vm: "e", slot: 1, firstPage: 1n << 20n })[Symbol.asyncIterator]().next(), status.INVALID_ARGUMENT, /past the end of slot 1/);
    await rejects(
      c().writeMemory([{ vm: "e", chunk: { slot: 1, firstPage: 0n, numPages: 2, contents: Buffer.alloc(8) } }]),
      status.INVALID_ARGUMENT,
      /need 16 content bytes/,
    );
  });

  test("NOT_FOUND", async () => {
    await rejects(c().getVm({ vm: "nope" }), status.NOT_FOUND, /no VM named 'nope'/);
    await rejects(c().getDirtyLog({ vm: "e", slot: 7 }), status.NOT_FOUND, /no memslot 7.*ENOENT/);
    await rejects(c().setUserMemoryRegion({ vm: "e", memslot: { slot: 7, memorySize: 0n } }), status.NOT_FOUND, /no such slot/);
  });

  test("FAILED_PRECONDITION", async () => {
    await rejects(c().getDirtyLog({ vm: "e", slot: 2 }), status.FAILED_PRECONDITION, /dirty logging is off.*ENOENT/);
    await rejects(c().clearDirtyLog({ vm: "e", slot: 2, numPages: 64, bitmap: Buffer.alloc(8) }), status.FAILED_PRECONDITION, /ENOENT/);
    await c().pauseVm({ vm: "e", vcpus: [1] });
    await rejects(c().guestWrite({ vm: "e", writes: [{ vcpu: 1, gpa: BigInt(GiB) }] }), status.FAILED_PRECONDITION, /vCPU 1.*paused/);
    await c().resumeVm({ vm: "e" });
    await rejects(c().enableCap({ vm: "e", capability: Capability.CAPABILITY_ARM_EAGER_SPLIT_CHUNK_SIZE, args: [2n ** 21n] }), status.FAILED_PRECONDITION, /before any memslot.*EINVAL/);
    await c().createVm({ vm: "rt", vcpus: 1, clock: ClockDrive.CLOCK_DRIVE_REALTIME });
    await rejects(c().advanceVm({ vm: "rt", durationNs: 1000n }), status.FAILED_PRECONDITION, /real time/);
  });

  test("RESOURCE_EXHAUSTED, ALREADY_EXISTS, PERMISSION_DENIED", async () => {
    await rejects(
      c().createVm({ vm: "big", vcpus: 1, ipaBits: 41, memslots: [{ slot: 0, guestPhysAddr: 0n, memorySize: BigInt(1024 * GiB) }] }),
      status.RESOURCE_EXHAUSTED,
      /VM 'big' \(1 TiB of guest memory, 1 vCPUs\) needs 4.* of hypervisor memory, but .* of this hypervisor's 4 GiB budget is left.*ENOMEM/,
    );
    await rejects(c().createVm({ vm: "e", vcpus: 1 }), status.ALREADY_EXISTS, /already exists/);
    await noInjection.client.createVm({ vm: "x", vcpus: 1 });
    await rejects(noInjection.client.setFaultInjection({ vm: "x", skipTlbFlushAfterWriteProtect: true }), status.PERMISSION_DENIED, /HYPERVISOR_ALLOW_FAULT_INJECTION/);
  });

  test("a write to a read-only slot exits to userspace as MMIO and leaves memory alone", async () => {
    const r = await c().guestWrite({ vm: "e", writes: [{ vcpu: 0, gpa: BigInt(3 * GiB), value: 7n }] });
    assert.equal(r.results[0].exit, 6);
    assert.equal((await c().translateGpa({ vm: "e", gpa: BigInt(3 * GiB) })).content, 0n);
  });
});
