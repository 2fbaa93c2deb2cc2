import assert from "node:assert/strict";
import { status } from "@grpc/grpc-js";
import { after, before, describe, test } from "node:test";
import { startDevice } from "../../../tests/hypervisor-harness.js";
import { bytesToGpas, gpasToBytes } from "../client.js";
import { BUFFER_GPAS } from "../model/device.js";
import type { TrackingMode } from "../../../proto/gen/dirtytrack/ptdevice/v1/ptdevice.js";
import { rejects } from "../../../tests/grpc-assert.js";

type Dev = Awaited<ReturnType<typeof startDevice>>;


/** Reports batches on one ReportWrites stream and waits for the last acknowledgement. */
async function report(d: Dev, batches: { vmid: number; cpu: number; gpas: number[] }[]) {
  const call = d.client.reportWrites();
  const acks: bigint[] = [];
  const done = new Promise<void>((resolve, reject) => {
    call.on("data", (r) => acks.push(r.ackedSeq));
    call.on("end", resolve);
    call.on("error", reject);
  });
  batches.forEach((b, i) => call.write({ vmid: b.vmid, cpu: b.cpu, seq: BigInt(i + 1), gpas: gpasToBytes(b.gpas) }));
  call.end();
  await done;
  return acks;
}

const gpa = (page: number) => 0x40000000 + page * 4096;
const pages = (from: number, n: number) => Array.from({ length: n }, (_, i) => gpa(from + i));

describe("page-tracking device", () => {
  let d: Dev;
  before(async () => (d = await startDevice()));
  after(() => d.close());

  test("buffers drain into the log when full or on flush; each GPA once until dirtied again; per-CPU reads", async () => {
    const { tracker } = await d.client.allocateTracker({ vmid: 7 });
    assert.equal((await d.client.enableTracking({ tracker, cpu: -1 })).references, 1);
    const acks = await report(d, [
      { vmid: 7, cpu: 0, gpas: pages(0, BUFFER_GPAS + 88) },
      { vmid: 7, cpu: 1, gpas: [gpa(5000), gpa(5001), gpa(0)] },
    ]);
    assert.deepEqual(acks, [1n, 2n]);
    const before = await d.client.readDirty({ tracker, cpu: -1, max: 100000 });
    assert.equal(before.count, BUFFER_GPAS, "only the full buffer reached the log");
    assert.deepEqual(Array.from(bytesToGpas(before.gpas)).slice(0, 3), pages(0, 3));
    assert.equal((await d.client.flush({ tracker })).flushed, 88n + 3n);
    const cpu1 = await d.client.readDirty({ tracker, cpu: 1, max: 10 });
    assert.deepEqual(Array.from(bytesToGpas(cpu1.gpas)), [gpa(5000), gpa(5001), gpa(0)], "gpa(0) was read already, so it is logged again");
    const rest = await d.client.readDirty({ tracker, cpu: -1, max: 50 });
    assert.deepEqual([rest.count, rest.remaining], [50, 38n]);
    await d.client.readDirty({ tracker, cpu: -1, max: 1000 });
    // Dirtied twice before a read: logged once.
    await report(d, [{ vmid: 7, cpu: 0, gpas: [gpa(9), gpa(9), gpa(9)] }]);
    await d.client.flush({ tracker });
    assert.equal((await d.client.readDirty({ tracker, cpu: -1, max: 10 })).count, 1);
    await d.client.disableTracking({ tracker, cpu: -1 });
    await d.client.releaseTracker({ tracker });
  });

  test("tracking per CPU: only enabled CPUs are logged; references count", async () => {
    const { tracker } = await d.client.allocateTracker({ vmid: 8 });
    await d.client.enableTracking({ tracker, cpu: 2 });
    assert.equal((await d.client.enableTracking({ tracker, cpu: 2 })).references, 2);
    await report(d, [
      { vmid: 8, cpu: 2, gpas: [gpa(1)] },
      { vmid: 8, cpu: 3, gpas: [gpa(2)] },
    ]);
    await d.client.flush({ tracker });
    assert.deepEqual(Array.from(bytesToGpas((await d.client.readDirty({ tracker, cpu: -1, max: 10 })).gpas)), [gpa(1)]);
    await rejects(d.client.disableTracking({ tracker, cpu: 2 }), status.FAILED_PRECONDITION, /1 reference\(s\) remain.*EBUSY/);
    await rejects(d.client.releaseTracker({ tracker }), status.FAILED_PRECONDITION, /still enabled.*EBUSY/);
    assert.equal((await d.client.disableTracking({ tracker, cpu: 2 })).references, 0);
    await rejects(d.client.disableTracking({ tracker, cpu: 2 }), status.FAILED_PRECONDITION, /not enabled.*EINVAL/);
    await d.client.releaseTracker({ tracker });
  });

  test("an overflowing log says so once, so that the reader treats everything as dirty", async () => {
    const small = await startDevice({ logCapacity: 100 });
    try {
      const { tracker } = await small.client.allocateTracker({ vmid: 1 });
      await small.client.enableTracking({ tracker, cpu: -1 });
      await report(small, [{ vmid: 1, cpu: 0, gpas: pages(0, 300) }]);
      await small.client.flush({ tracker });
      const r = await small.client.readDirty({ tracker, cpu: -1, max: 1000 });
      assert.deepEqual([r.count, r.overflowed], [100, true]);
      assert.equal((await small.client.readDirty({ tracker, cpu: -1, max: 1000 })).overflowed, false);
      const m = await fetch(`http://127.0.0.1:${small.httpPort}/metrics`).then((x) => x.text());
      assert.match(m, /^ptdevice_log_overflows_total\{vmid="1"\} 1$/m);
    } finally {
      await small.close();
    }
  });

  test("bad input by status code", async () => {
    await rejects(d.client.allocateTracker({ vmid: 0 }), status.INVALID_ARGUMENT, /VMID 0.*EINVAL/);
    const { tracker } = await d.client.allocateTracker({ vmid: 9 });
    await rejects(d.client.allocateTracker({ vmid: 9 }), status.ALREADY_EXISTS, /already has tracker.*EEXIST/);
    await rejects(d.client.enableTracking({ tracker: 999n, cpu: 0 }), status.NOT_FOUND, /no tracker 999.*ENOENT/);
    await rejects(d.client.enableTracking({ tracker, cpu: 5000 }), status.INVALID_ARGUMENT, /cpu 5000.*EINVAL/);
    await rejects(d.client.enableTracking({ tracker, cpu: -2 }), status.INVALID_ARGUMENT, /cpu -2/);
    await rejects(d.client.readDirty({ tracker, cpu: -1, max: 0 }), status.INVALID_ARGUMENT, /max 0.*EINVAL/);
    await rejects(d.client.releaseTracker({ tracker: 0n }), status.INVALID_ARGUMENT, /not a tracker id/);
    await rejects(d.client.allocateTracker({ vmid: 10, mode: 5 as TrackingMode }), status.INVALID_ARGUMENT, /mode 5/);
    const bad = d.client.reportWrites();
    const err = new Promise<{ code: number; details: string }>((resolve) => bad.on("error", resolve));
    bad.on("data", () => undefined);
    bad.write({ vmid: 9, cpu: 0, seq: 2n, gpas: Buffer.alloc(8) });
    bad.write({ vmid: 9, cpu: 0, seq: 1n, gpas: Buffer.alloc(8) });
    const e = await err;
    assert.equal(e.code, status.INVALID_ARGUMENT);
    assert.match(e.details, /sequence 1 after 2/);
    const bad2 = d.client.reportWrites();
    const err2 = new Promise<{ code: number; details: string }>((resolve) => bad2.on("error", resolve));
    bad2.write({ vmid: 9, cpu: 0, seq: 1n, gpas: Buffer.alloc(5) });
    assert.match((await err2).details, /5 bytes is not a whole number/);
  });
});

describe("the device's memory is bounded by its configuration", () => {
  /** 100,000 distinct random 4 KiB-aligned GPAs below 2^48 (as sparse as addresses get). */
  const sparse = (n: number, seed: number) => {
    const out = new Set<number>();
    let x = seed;
    while (out.size < n) {
      x = (Math.imul(x, 1103515245) + 12345) >>> 0;
      const y = (Math.imul(x ^ 0x5bd1e995, 2654435761) >>> 0) & 0xfffff;
      out.add((x * 2 ** 20 + y) * 4096 % 2 ** 48);
    }
    return [...out];
  };

  test("a tracked GPA costs a small constant however sparse the addresses, and each is read back once", async () => {
    const d = await startDevice();
    try {
      const { tracker } = await d.client.allocateTracker({ vmid: 1 });
      await d.client.enableTracking({ tracker, cpu: -1 });
      const gpas = sparse(100_000, 7);
      await report(d, Array.from({ length: 10 }, (_, i) => ({ vmid: 1, cpu: i % 4, gpas: gpas.slice(i * 10_000, (i + 1) * 10_000) })));
      await d.client.flush({ tracker });
      const perGpa = d.device.allocatedBytes / gpas.length;
      // The set's at most 43 bytes per sparse GFN, the log's 8, and a few buffers.
      assert.ok(perGpa <= 56, `${perGpa.toFixed(1)} bytes per GPA`);
      const got: number[] = [];
      for (;;) {
        const r = await d.client.readDirty({ tracker, cpu: -1, max: 1 << 16 });
        if (r.count === 0) break;
        got.push(...bytesToGpas(r.gpas));
      }
      assert.deepEqual(got.sort((a, b) => a - b), [...gpas].sort((a, b) => a - b));
      assert.ok(d.device.allocatedBytes < 64 * 1024, `${d.device.allocatedBytes} bytes once read`);
    } finally {
      await d.close();
    }
  });

  test("past the log's capacity the device stays within it and reports the overflow", async () => {
    const d = await startDevice({ logCapacity: 1000 });
    try {
      const { tracker } = await d.client.allocateTracker({ vmid: 1 });
      await d.client.enableTracking({ tracker, cpu: -1 });
      await report(d, [{ vmid: 1, cpu: 0, gpas: sparse(100_000, 9) }]);
      await d.client.flush({ tracker });
      assert.ok(d.device.allocatedBytes < 1000 * 56 + 64 * 1024, `${d.device.allocatedBytes} bytes`);
      const r = await d.client.readDirty({ tracker, cpu: -1, max: 1 << 16 });
      assert.equal(r.count, 1000);
      assert.equal(r.overflowed, true);
    } finally {
      await d.close();
    }
  });

  test("trackers are limited (ENOSPC); a new hypervisor link's allocation releases the old link's trackers", async () => {
    const d = await startDevice({ maxTrackers: 2 });
    try {
      await d.client.allocateTracker({ vmid: 1, owner: "old/1" });
      const { tracker: t2 } = await d.client.allocateTracker({ vmid: 2, owner: "old/1" });
      await d.client.enableTracking({ tracker: t2, cpu: -1 });
      await rejects(d.client.allocateTracker({ vmid: 3, owner: "old/1" }), status.RESOURCE_EXHAUSTED, /holds 2 trackers.*ENOSPC/);
      // A restarted hypervisor reuses VMID 1: the old link's trackers, enabled or not, go.
      await d.client.allocateTracker({ vmid: 1, owner: "new/1" });
      assert.deepEqual([...d.device.trackers.values()].map((t) => [t.vmid, t.owner]), [[1, "new/1"]]);
      assert.equal(d.device.orphansReleased, 2);
    } finally {
      await d.close();
    }
  });
});

describe("GfnSet", () => {
  test("adds, finds and deletes like a Set through growth, shrinkage and collisions", async () => {
    const { GfnSet } = await import("../model/gfn-set.js");
    const set = new GfnSet();
    const ref = new Set<number>();
    let x = 1;
    for (let i = 0; i < 200_000; i++) {
      x = (Math.imul(x, 1664525) + 1013904223) >>> 0;
      // Keys from a small range collide often; some are far apart (up to 2^36 frames).
      const gfn = x & 1 ? x % 5000 : (x % 1000) * 2 ** 26 + (x >>> 22);
      if (x & 2) assert.equal(set.add(gfn), !ref.has(gfn)), ref.add(gfn);
      else set.delete(gfn), ref.delete(gfn);
      if (i % 997 === 0) for (const k of [gfn, gfn + 1, 4999]) assert.equal(set.has(k), ref.has(k), `gfn ${k} at step ${i}`);
    }
    assert.equal(set.size, ref.size);
    for (const k of ref) assert.ok(set.has(k));
    for (const k of ref) set.delete(k);
    assert.equal(set.size, 0);
    assert.ok(set.allocatedBytes <= 64 * 16, "the table shrinks back");
  });
});
