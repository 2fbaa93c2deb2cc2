/**
 * Post-copy on the destination (userfaultfd): a vCPU that touches a missing
 * page, by a write or a read, waits and raises one page request; it goes on
 * when the page lands, at the time the sender gave; a late copy never
 * overwrites the guest; blocktime is counted per vCPU and for the VM; the
 * resume snapshot becomes the source's memory at the switch; bad input is
 * refused.
 */
import assert from "node:assert/strict";
import { status } from "@grpc/grpc-js";
import { after, before, describe, test } from "node:test";
import { BackingPageSize, WorkloadPattern } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { rejects } from "../../../tests/grpc-assert.js";
import { GiB, MiB, startHypervisor, type RunningHypervisor } from "../../../tests/hypervisor-harness.js";
import type { HypervisorClient } from "../client.js";

const PAGES = (4 * MiB) / 4096;
const word = (p: number) => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(0x1000 + p));
  return b;
};

describe("post-copy on the destination", () => {
  let h: RunningHypervisor;
  before(async () => (h = await startHypervisor()));
  after(() => h.close());
  const c = (): HypervisorClient => h.client;

  /** A paused destination of 4 MiB whose every page holds 0x1000 + its index, as pre-copy left it. */
  async function destination(vm: string, workload: { writesPerSecond: number; readsPerSecond?: number }) {
    await c().createVm({
      vm,
      vcpus: 2,
      seed: 7n,
      startPaused: true,
      memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(4 * MiB) }],
      workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, ...workload },
    });
    await c().writeMemory([{ vm, chunk: { slot: 0, firstPage: 0n, numPages: PAGES, bitmap: Buffer.alloc(0), contents: Buffer.concat(Array.from({ length: PAGES }, (_, p) => word(p))), arriveAtNs: 0n } }]);
  }
  const all = () => Buffer.alloc(PAGES / 8, 0xff);

  test("writes to missing pages wait and raise one request each; pages land at their time; a late copy is dropped; the snapshot is the source", async () => {
    const vm = "pc";
    await destination(vm, { writesPerSecond: 100_000 });
    const expected = await c().getMemoryDigest({ vm }); // the "source" at the switch: every page as written above
    // Every page missing (their stale content is zeroed to show they are not used).
    await c().writeMemory([{ vm, chunk: { slot: 0, firstPage: 0n, numPages: PAGES, bitmap: Buffer.alloc(0), contents: Buffer.alloc(PAGES * 8), arriveAtNs: 0n } }]);
    const started = await c().startPostcopy({ vm, missing: [{ slot: 0, bitmap: all() }] });
    assert.equal(started.vm!.postcopy?.active, true);
    assert.equal(started.vm!.postcopy?.unsentPages, BigInt(PAGES));
    await c().resumeVm({ vm, snapshot: true });
    const seen: number[] = [];
    const stream = c().watchPageRequests({ vm, fromSequence: 1n });
    const reading = (async () => {
      for await (const r of stream) seen.push(Number(r.request!.page));
    })().catch(() => undefined);

    const a = await c().advanceVm({ vm, durationNs: 1_000_000n });
    assert.equal(a.pageRequests, 2n, "each vCPU's first write faults on a missing page and waits: one request each");
    assert.deepEqual(a.vcpus.map((v) => v.writes), [0n, 0n], "no write happens before its page lands");
    const again = await c().advanceVm({ vm, durationNs: 1_000_000n });
    assert.equal(again.pageRequests, 2n, "a waiting vCPU raises nothing more");
    await until(() => seen.length === 2);

    // Land the two pages 100 µs from now; the vCPUs go on then and fault on the next missing page.
    const now = Number(again.clockNs);
    for (const p of seen) {
      await c().writeMemory([{ vm, chunk: { slot: 0, firstPage: BigInt(p), numPages: 1, bitmap: Buffer.alloc(0), contents: word(p), arriveAtNs: BigInt(now + 100_000) } }]);
    }
    const b = await c().advanceVm({ vm, durationNs: 1_000_000n });
    assert.deepEqual(b.vcpus.map((v) => v.writes), [1n, 1n], "each vCPU's write completes once its page lands, then it waits on the next one");
    const info = (await c().getVm({ vm })).vm!.postcopy!;
    assert.equal(info.requests, 4n);
    for (const [i, ns] of info.vcpuBlocktimeNs.entries()) assert.ok(Number(ns) > 2_000_000 && Number(ns) < 3_000_000, `vCPU ${i} waited ${ns} ns`);
    assert.ok(Number(info.blocktimeNs) > 2_000_000, `both vCPUs waited together for ${info.blocktimeNs} ns`);

    // A second copy of a page the guest has written since is dropped: the guest's value stays.
    const written = seen[0];
    const before = await readAll(c(), vm, written);
    await c().writeMemory([{ vm, chunk: { slot: 0, firstPage: BigInt(written), numPages: 1, bitmap: Buffer.alloc(0), contents: word(written), arriveAtNs: 0n } }]);
    assert.equal((await c().getVm({ vm })).vm!.postcopy!.duplicatePages, 1n);
    assert.notDeepEqual(before, word(written), "the guest wrote the page after it landed");
    assert.deepEqual(await readAll(c(), vm, written), before, "the late copy did not overwrite it");

    await rejects(c().getMemoryDigest({ vm, atResume: true }), status.FAILED_PRECONDITION, /is in post-copy; \d+ pages are not sent/);
    // Land everything else in one go; post-copy ends once it has landed.
    const end = Number((await c().getVm({ vm })).vm!.clockNs) + 500_000;
    await c().writeMemory([{ vm, chunk: { slot: 0, firstPage: 0n, numPages: PAGES, bitmap: Buffer.alloc(0), contents: Buffer.concat(Array.from({ length: PAGES }, (_, p) => word(p))), arriveAtNs: BigInt(end) } }]);
    await c().advanceVm({ vm, durationNs: 1_000_000n });
    const done = (await c().getVm({ vm })).vm!.postcopy!;
    assert.equal(done.active, false);
    assert.equal(done.unsentPages, 0n);
    assert.equal((await c().getMemoryDigest({ vm, atResume: true })).sha256Hex, expected.sha256Hex, "the snapshot holds every page as the source had it at the switch");
    await reading;
  });

  test("a read of a missing page waits for it too; reads of pages that are here cost nothing", async () => {
    const vm = "pc-read";
    await destination(vm, { writesPerSecond: 0, readsPerSecond: 200_000 });
    await c().setWorkload({ vm, workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, writesPerSecond: 1, readsPerSecond: 200_000 } });
    const half = Buffer.alloc(PAGES / 8);
    for (let i = 0; i < half.length; i += 2) half[i] = 0xff; // half the pages, in runs of 8
    await c().startPostcopy({ vm, missing: [{ slot: 0, bitmap: half }] });
    await c().resumeVm({ vm });
    const a = await c().advanceVm({ vm, durationNs: 1_000_000n });
    assert.ok(a.pageRequests >= 1n && a.pageRequests <= 2n, `${a.pageRequests} requests: each vCPU reads until it touches a missing page`);
    const info = (await c().getVm({ vm })).vm!.postcopy!;
    assert.ok(info.vcpuBlocktimeNs.some((ns) => ns > 0n));
  });

  test("refused: a running VM, huge backing, a bad bitmap, arrive_at_ns outside post-copy, watching without post-copy", async () => {
    await c().createVm({ vm: "pc-run", vcpus: 1, memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(4 * MiB) }] });
    await rejects(c().startPostcopy({ vm: "pc-run", missing: [] }), status.FAILED_PRECONDITION, /every vCPU of VM pc-run must be paused/);
    await c().createVm({ vm: "pc-2m", vcpus: 1, startPaused: true, backingPageSize: BackingPageSize.BACKING_PAGE_SIZE_2M, memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(4 * MiB) }] });
    await rejects(c().startPostcopy({ vm: "pc-2m", missing: [] }), status.FAILED_PRECONDITION, /userfaultfd resolves a huge page whole/);
    await c().createVm({ vm: "pc-bad", vcpus: 1, startPaused: true, memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(4 * MiB) }] });
    await rejects(c().startPostcopy({ vm: "pc-bad", missing: [{ slot: 0, bitmap: Buffer.alloc(3) }] }), status.INVALID_ARGUMENT, /bitmap has 3 bytes for 1024 pages/);
    await rejects(c().startPostcopy({ vm: "pc-bad", missing: [{ slot: 9, bitmap: Buffer.alloc(3) }] }), status.INVALID_ARGUMENT, /no slot 9/);
    await rejects(
      c().writeMemory([{ vm: "pc-bad", chunk: { slot: 0, firstPage: 0n, numPages: 1, bitmap: Buffer.alloc(0), contents: word(0), arriveAtNs: 5n } }]),
      status.INVALID_ARGUMENT,
      /arrive_at_ns is for a VM in post-copy/,
    );
    const s = c().watchPageRequests({ vm: "pc-bad", fromSequence: 1n });
    await rejects((async () => { for await (const _ of s) void _; })(), status.FAILED_PRECONDITION, /not in post-copy/);
  });
});

async function readAll(c: HypervisorClient, vm: string, page: number): Promise<Buffer> {
  for await (const r of c.readMemory({ vm, slot: 0, firstPage: BigInt(page), numPages: 1n })) return Buffer.from(r.chunk!.contents);
  throw new Error("no chunk");
}

async function until(cond: () => boolean): Promise<void> {
  for (let i = 0; i < 200 && !cond(); i++) await new Promise((r) => setTimeout(r, 5));
  assert.ok(cond(), "timed out");
}
