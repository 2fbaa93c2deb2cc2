import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { startHypervisor, type RunningHypervisor } from "../../../tests/hypervisor-harness.js";
import { collectClearLog, collectDirtyLog, runSelftest } from "../../../tests/selftest.js";

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

  test("skipping the TLB flush after write protection loses dirty pages, and the invariant catches it", async () => {
    const dirty = await runSelftest(h.client, { vm: "st-noflush", collect: collectDirtyLog, inject: { skipTlbFlushAfterWriteProtect: true } });
    assert.ok(dirty.lost > 0, "writes through stale writable TLB entries must go unlogged");
    const clear = await runSelftest(h.client, { vm: "st-noflush-clear", collect: collectClearLog, initiallySet: true, inject: { skipTlbFlushAfterWriteProtect: true } });
    assert.ok(clear.lost > 0);
  });
});
