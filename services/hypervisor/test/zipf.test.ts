/**
 * The Zipf workload (a key-value store): ranks drawn with the Zipf law's
 * probabilities, scattered over the working set, deterministic for a seed.
 */
import assert from "node:assert/strict";
import { status } from "@grpc/grpc-js";
import { after, before, describe, test } from "node:test";
import { MemslotFlag, WorkloadPattern } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { rejects } from "../../../tests/grpc-assert.js";
import { GiB, MiB, startHypervisor, type RunningHypervisor } from "../../../tests/hypervisor-harness.js";
import { Rng } from "../model/rng.js";
import { BATCH, IDLE, workloadGen } from "../model/workload.js";
import { ZipfSampler } from "../model/zipf.js";

test("ranks follow the Zipf law: P(k) = k^-s / H(n, s)", () => {
  for (const s of [0.5, 0.99, 1.5]) {
    const n = 1000;
    const norm = Array.from({ length: n }, (_, i) => (i + 1) ** -s).reduce((a, b) => a + b, 0);
    const z = new ZipfSampler(n, s);
    const rng = new Rng(42n);
    const draws = 200_000;
    const counts = new Uint32Array(n + 1);
    for (let i = 0; i < draws; i++) counts[z.sample(rng)]++;
    assert.equal(counts[0], 0, "ranks start at 1");
    for (const k of [1, 2, 10, 100]) {
      const p = k ** -s / norm;
      const sd = Math.sqrt((p * (1 - p)) / draws);
      assert.ok(Math.abs(counts[k] / draws - p) < 5 * sd, `s ${s}, rank ${k}: ${counts[k] / draws} against ${p}`);
    }
  }
});

test("the generator scatters the ranks over the working set, stays in it, and resumes exactly from a saved position", () => {
  const spec = { ...IDLE, pattern: "zipf" as const, writesPerSecond: 1e6, firstPage: 100, pages: 5000, zipfSkew: 0.99 };
  const gen = workloadGen(spec, 10_000, 7n, 0, 1);
  gen.refill(0);
  const pages = Array.from(gen.batch);
  assert.ok(pages.every((p) => p >= 100 && p < 5100));
  const counts = new Map<number, number>();
  for (const p of pages) counts.set(p, (counts.get(p) ?? 0) + 1);
  const top = [...counts.entries()].sort((a, b) => b[1] - a[1]).slice(0, 5).map(([p]) => p);
  assert.ok(counts.get(top[0])! > BATCH / 20, "the hottest key takes a large share");
  assert.ok(Math.max(...top) - Math.min(...top) > 500, `the hottest keys are scattered, not adjacent: ${top}`);
  const again = workloadGen(spec, 10_000, 7n, 0, 1);
  again.refill(0);
  assert.deepEqual(Array.from(again.batch), pages, "a seed gives the same pages");
  const saved = gen.save(0);
  gen.refill(0);
  const resumed = workloadGen(spec, 10_000, 7n, 0, 1);
  resumed.restore(saved, "test", 0);
  resumed.refill(0);
  assert.deepEqual(Array.from(resumed.batch), Array.from(gen.batch));
});

describe("the Zipf workload over gRPC", () => {
  let h: RunningHypervisor;
  before(async () => (h = await startHypervisor()));
  after(() => h.close());
  const slot = { slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(256 * MiB), flags: MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES };

  test("a skewed key-value store dirties far fewer pages than uniform writes at the same rate", async () => {
    const dirty = async (vm: string, pattern: WorkloadPattern, zipfSkew = 0) => {
      await h.client.createVm({ vm, vcpus: 1, seed: 3n, memslots: [slot], workload: { pattern, writesPerSecond: 200_000, zipfSkew } });
      await h.client.advanceVm({ vm, durationNs: 100_000_000n });
      return Number((await h.client.getDirtyLog({ vm, slot: 0 })).dirtyPages);
    };
    const uniform = await dirty("kv-uniform", WorkloadPattern.WORKLOAD_PATTERN_UNIFORM);
    const zipf = await dirty("kv-zipf", WorkloadPattern.WORKLOAD_PATTERN_ZIPF, 1.2);
    assert.ok(zipf < uniform / 3, `zipf ${zipf} pages against uniform ${uniform}`);
  });

  test("a skew out of range is refused with a precise status", async () => {
    await h.client.createVm({ vm: "kv-bad", vcpus: 1, memslots: [slot] });
    await rejects(h.client.setWorkload({ vm: "kv-bad", workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_ZIPF, writesPerSecond: 1, zipfSkew: 11 } }), status.INVALID_ARGUMENT, /workload zipf_skew 11 must be in \(0, 10\]/);
  });
});
