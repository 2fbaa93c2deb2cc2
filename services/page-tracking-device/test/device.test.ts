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
