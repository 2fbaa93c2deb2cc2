/**
 * Guests past the sizes where single buffers break: a 1 TiB guest's digest
 * (its slot's content is 2 GiB, past one 2^31-byte hash update) equals a
 * reference computed in other parts; a 2 TiB guest laid out as the
 * controller lays it out (two 1 TiB slots) is created and its dirty log read.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { after, before, describe, test } from "node:test";
import { MemslotFlag } from "../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { guestMemslots, ipaBitsFor, MAX_SLOT_BYTES, RAM_BASE } from "../clients/migration-controller/guest.js";
import { startHypervisor, type RunningHypervisor } from "./hypervisor-harness.js";

const TiB = 2 ** 40;

describe("the controller's guest layout", () => {
  test("slots of at most 1 TiB from RAM_BASE, contiguous, and an IPA size that holds them", () => {
    assert.deepEqual(
      guestMemslots(4096 * 3).map((s) => [s.slot, Number(s.guestPhysAddr), Number(s.memorySize)]),
      [[0, RAM_BASE, 4096 * 3]],
    );
    const big = guestMemslots(2 * TiB + 4096);
    assert.deepEqual(
      big.map((s) => [s.slot, Number(s.guestPhysAddr), Number(s.memorySize)]),
      [
        [0, RAM_BASE, MAX_SLOT_BYTES],
        [1, RAM_BASE + TiB, MAX_SLOT_BYTES],
        [2, RAM_BASE + 2 * TiB, 4096],
      ],
    );
    assert.deepEqual([ipaBitsFor(2 ** 30), ipaBitsFor(TiB), ipaBitsFor(2 * TiB)], [40, 41, 42]);
  });
});

describe("scale", () => {
  let h: RunningHypervisor;
  before(async () => (h = await startHypervisor({ memoryBudgetBytes: 2 ** 36 })));
  after(() => h.close());

  test("a 1 TiB guest's digest equals SHA-256 computed over the same bytes in 1 GiB parts", async () => {
    await h.client.createVm({ vm: "tib", vcpus: 1, ipaBits: ipaBitsFor(TiB), memslots: guestMemslots(TiB) });
    // Values on both sides of the 2^31-byte boundary of the slot's content, and at its ends.
    const pages = [0n, 2n ** 28n / 2n - 1n, 2n ** 28n / 2n, 2n ** 28n - 1n];
    await h.client.hostWrite({ vm: "tib", writes: pages.map((p, i) => ({ gpa: BigInt(RAM_BASE) + p * 4096n, value: 0x1234567890n + BigInt(i) })) });
    const d = await h.client.getMemoryDigest({ vm: "tib" }, { deadlineMs: 120_000 });
    const slot = h.hypervisor.vm("tib").slots.get(0)!;
    const ref = createHash("sha256");
    const header = Buffer.alloc(24);
    header.writeUInt32LE(0, 0);
    header.writeBigUInt64LE(BigInt(RAM_BASE), 8);
    header.writeBigUInt64LE(2n ** 28n, 16);
    ref.update(header);
    const bytes = new Uint8Array(slot.content.buffer, slot.content.byteOffset, slot.content.byteLength);
    for (let off = 0; off < bytes.byteLength; off += 2 ** 30) ref.update(bytes.subarray(off, off + 2 ** 30));
    assert.equal(d.sha256Hex, ref.digest("hex"));
    assert.equal(d.pages, 2n ** 28n);
    await h.client.destroyVm({ vm: "tib" });
  });

  test("a 2 TiB guest in two 1 TiB slots: created, logging, and each slot's dirty log read", async () => {
    const slots = guestMemslots(2 * TiB).map((s) => ({ ...s, flags: MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES }));
    assert.equal(slots.length, 2);
    await h.client.createVm({ vm: "two-tib", vcpus: 1, ipaBits: ipaBitsFor(2 * TiB), memslots: slots });
    const last = BigInt(RAM_BASE) + 2n * BigInt(TiB) - 4096n;
    await h.client.guestWrite({ vm: "two-tib", writes: [{ vcpu: 0, gpa: last, value: 7n }] });
    for (const s of [0, 1]) {
      const g = await h.client.getDirtyLog({ vm: "two-tib", slot: s }, { deadlineMs: 120_000 });
      assert.equal(g.bitmap.byteLength, TiB / 4096 / 8, "a 32 MiB bitmap per slot");
      assert.equal(g.dirtyPages, s === 1 ? 1n : 0n);
      if (s === 1) assert.equal(g.bitmap[g.bitmap.byteLength - 1], 0x80, "the last page of the guest");
    }
    await h.client.destroyVm({ vm: "two-tib" });
  });
});
