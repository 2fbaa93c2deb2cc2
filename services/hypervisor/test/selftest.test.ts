import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { startHypervisor, type RunningHypervisor } from "../../../tests/hypervisor-harness.js";
import { status } from "@grpc/grpc-js";
import { collectClearLog, collectDirtyLog, runSelftest, type Collect } from "../../../tests/selftest.js";

describe("kernel dirty_log_test invariant over gRPC (slot of 1 GiB + 3 pages)", () => {
  let h: RunningHypervisor;
  before(async () => (h = await startHypervisor()));
  after(() => h.close());

  test("dirty-log mode (GET_DIRTY_LOG) reports exactly the pages written each iteration", async () => {
    const r = await runSelftest(h.client, { vm: "st-dirty-log", collect: collectDirtyLog });
    assert.equal(r.falseDirty, 0);
    assert.equal(r.lost, 0);
    // The selftest needs at least 0x100 writes per iteration to mean anything.
    for (const n of r.dirtyPerIteration) assert.ok(n > 0x100, `only ${n} pages dirtied in an iteration`);
  });

  test("clear-log mode (MANUAL_PROTECT + INITIALLY_SET, GET then CLEAR) keeps the invariant", async () => {
    const r = await runSelftest(h.client, { vm: "st-clear-log", collect: collectClearLog, initiallySet: true });
    assert.equal(r.falseDirty, 0);
    assert.equal(r.lost, 0);
    // Iteration 1 reports the whole slot: the log started all set.
    assert.equal(r.dirtyPerIteration[0], r.pages);
    for (const n of r.dirtyPerIteration.slice(1)) assert.ok(n > 0x100 && n < r.pages / 2);
  });

  test("with the vCPU running through the mid-iteration GET and CLEAR, the invariant holds", async () => {
    for (const [name, collect, initiallySet] of [["st-run-dirty-log", collectDirtyLog, false], ["st-run-clear-log", collectClearLog, true]] as const) {
      const r = await runSelftest(h.client, { vm: name, collect, initiallySet, vcpusRun: true });
      assert.equal(r.falseDirty, 0, name);
      assert.equal(r.lost, 0, name);
    }
  });

  test("with the vCPU running through the GET, skipping the TLB flush still loses pages, and the invariant catches it", async () => {
    const r = await runSelftest(h.client, { vm: "st-run-noflush", collect: collectDirtyLog, vcpusRun: true, inject: { skipTlbFlushAfterWriteProtect: true } });
    assert.ok(r.lost > 0);
  });

  test("skipping the TLB flush after write protection loses dirty pages, and the invariant catches it", async () => {
    const dirty = await runSelftest(h.client, { vm: "st-noflush", collect: collectDirtyLog, inject: { skipTlbFlushAfterWriteProtect: true } });
    assert.ok(dirty.lost > 0, "writes through stale writable TLB entries must go unlogged");
    const clear = await runSelftest(h.client, { vm: "st-noflush-clear", collect: collectClearLog, initiallySet: true, inject: { skipTlbFlushAfterWriteProtect: true } });
    assert.ok(clear.lost > 0);
  });

  test("a GET that consumes the bits and then fails to copy them loses pages for a caller that retries: the invariant catches it", async () => {
    // The VMM's natural reaction to a failed GET, retrying it, gets only what was dirtied since.
    const failures: { code: number; details: string }[] = [];
    const retrying: Collect = async (c, vm, slot, n) => {
      try {
        return await collectDirtyLog(c, vm, slot, n);
      } catch (err) {
        failures.push(err as { code: number; details: string });
        return collectDirtyLog(c, vm, slot, n);
      }
    };
    const r = await runSelftest(h.client, { vm: "st-get-copy", collect: retrying, inject: { failEveryOtherGetCopy: true } });
    assert.ok(r.lost > 0, `${r.lost} pages lost`);
    // The failure itself is a precise status.
    assert.ok(failures.length > 0);
    assert.equal(failures[0].code, status.ABORTED);
    assert.match(failures[0].details, /copying the bitmap of slot 1 out failed after it was cleared.*EFAULT/);
  });
});

