import assert from "node:assert/strict";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { Capability, WorkloadPattern } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { GiB, MiB, startHypervisor, type RunningHypervisor } from "../../../tests/hypervisor-harness.js";
import { EXIT } from "../cli.js";
import { decodeTrace, encodeTrace } from "../trace/format.js";
import { readTrace, traceWorkloads } from "../trace/replay.js";
import { cli, noStack } from "./cli-harness.js";

const PAGES = (64 * MiB) / 4096;

describe("traces: record and replay", () => {
  let h: RunningHypervisor;
  let dir: string;
  before(async () => {
    h = await startHypervisor();
    dir = await mkdtemp(join(tmpdir(), "trace-"));
  });
  after(async () => {
    await h.close();
    await rm(dir, { recursive: true, force: true });
  });

  /** A 2-vCPU VM of 64 MiB with every page touched, with dirty rings or without. */
  async function guest(vm: string, rings: boolean) {
    await h.client.createVm({
      vm,
      vcpus: 2,
      seed: 9n,
      memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(64 * MiB) }],
      dirtyRing: rings ? { capability: Capability.CAPABILITY_DIRTY_LOG_RING_ACQ_REL, bytes: 65536n, withBitmap: true } : undefined,
      workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: 1e8 },
    });
    await h.client.advanceVm({ vm, durationNs: 100_000_000n });
  }

  async function record(vm: string, out: string) {
    const r = await cli(["record", "--source", h.address, "--vm", vm, "--interval", "50ms", "--intervals", "8", "--out", out]);
    assert.equal(r.code, EXIT.ok, r.err);
    return { text: r.out, trace: decodeTrace(await readFile(out)) };
  }

  async function replayOn(vm: string, file: string) {
    const t = readTrace(file);
    for (const [vcpu, workload] of traceWorkloads(t, file, 2, PAGES).entries()) await h.client.setWorkload({ vm, vcpu, workload });
  }

  const pagesOf = (t: { pages: Uint32Array[][] }) => t.pages.map((row) => row.map((p) => Array.from(p)));

  test("a trace recorded per vCPU from the rings and replayed gives the same dirty pages per interval; each vCPU only its own", async () => {
    await guest("src", true);
    await h.client.setWorkload({ vm: "src", workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_HOT_COLD, writesPerSecond: 20_000, hotFraction: 0.1 } });
    const first = await record("src", join(dir, "one.dtt"));
    assert.match(first.text, /per vCPU \(2, from the dirty rings\)/);
    assert.equal(first.trace.pages.length, 8);
    assert.ok(first.trace.pages.every((row) => row.length === 2 && row.every((p) => p.length > 100)), "each vCPU dirtied pages in each interval");
    const src = (await h.client.getVm({ vm: "src" })).vm!;
    assert.ok(src.memslots.every((s) => !s.logging) && src.vcpus.every((v) => v.dirtyRingEntries === 0), "logging off and the rings empty afterwards");

    await guest("replay", true);
    await replayOn("replay", join(dir, "one.dtt"));
    const again = await record("replay", join(dir, "two.dtt"));
    const union = (t: { pages: Uint32Array[][] }) => t.pages.map((row) => [...new Set(row.flatMap((p) => [...p]))].sort((a, b) => a - b));
    assert.deepEqual(union(again.trace), union(first.trace), "the same pages in every interval");
    // A page two vCPUs dirty within one reap goes to the ring of the first (KVM's per-slot pending bit), so the replay's
    // vCPU records may hold fewer of the shared pages, never one its vCPU did not write.
    again.trace.pages.forEach((row, k) => row.forEach((p, v) => {
      const own = new Set(first.trace.pages[k][v]);
      assert.ok([...p].every((x) => own.has(x)), `interval ${k}, vCPU ${v}`);
    }));
  });

  test("without rings the trace is per VM; replayed over the vCPUs it gives the same pages per interval", async () => {
    await guest("bm", false);
    await h.client.setWorkload({ vm: "bm", workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, writesPerSecond: 5_000 } });
    const first = await record("bm", join(dir, "bm.dtt"));
    assert.match(first.text, /per VM \(no dirty rings: from the bitmap\)/);
    await guest("bm-replay", false);
    await replayOn("bm-replay", join(dir, "bm.dtt"));
    const again = await record("bm-replay", join(dir, "bm2.dtt"));
    assert.deepEqual(pagesOf(again.trace), pagesOf(first.trace));
  });

  test("the demo replays a trace as its workload and migrates it verified", async () => {
    const r = await cli(["demo", "--memory", "64MiB", "--workload", "trace", "--trace", join(dir, "one.dtt"), "--bandwidth", "1Gbit", "--quiet"]);
    assert.equal(r.code, EXIT.ok, r.err);
    assert.match(r.out, /\(bitmap, stepped clock\): completed, verified/);
    assert.match(r.out, /guest writes\/s/);
  });

  test("a truncated or malformed trace is refused with the offset of the first bad record (exit 2)", async () => {
    const good = await readFile(join(dir, "one.dtt"));
    const t = decodeTrace(good);
    const cases: [string, Uint8Array, RegExp][] = [
      ["short", good.subarray(0, 20), /at byte 20: truncated: the header is 40 bytes/],
      ["magic", Uint8Array.from([...Buffer.from("NOTATRACE"), ...good.subarray(9)]), /at byte 0: not a dirty-page trace/],
      ["cut", good.subarray(0, good.length - 3), /at byte \d+: truncated in the record of interval 7, vCPU 1/],
      ["tail", Uint8Array.from([...good, 0]), /at byte \d+: 1 bytes after the last record/],
      ["past", encodeTrace({ ...t, guestPages: 100, pages: [[Uint32Array.of(5), Uint32Array.of(200)]] }), /at byte 42: page 200 in the record of interval 0, vCPU 1 is past the guest's 100 pages/],
    ];
    for (const [name, bytes, message] of cases) {
      const f = join(dir, `${name}.dtt`);
      await writeFile(f, bytes);
      const r = await cli(["demo", "--memory", "64MiB", "--workload", "trace", "--trace", f, "--quiet"]);
      assert.equal(r.code, EXIT.usage, `${name}: ${r.err}`);
      assert.match(r.err, message, name);
      noStack(r.err);
    }
    for (const [args, message] of [
      [["--vcpus", "3"], /recorded per vCPU from 2 vCPUs; the guest has 3 \(give --vcpus 2\)/],
      [["--memory", "16MiB"], /recorded from a guest of 16384 pages; this one has 4096 \(give --memory 64MiB or more\)/],
      [["--noisy-vcpu-rate", "5"], /--noisy-vcpu-rate does not apply to --workload trace/],
    ] as [string[], RegExp][]) {
      const r = await cli(["demo", "--memory", "64MiB", "--workload", "trace", "--trace", join(dir, "one.dtt"), "--quiet", ...args]);
      assert.equal(r.code, EXIT.usage, r.err);
      assert.match(r.err, message);
    }
    const missing = await cli(["demo", "--workload", "trace", "--quiet"]);
    assert.match(missing.err, /--workload trace needs --trace FILE/);
    const noVm = await cli(["record", "--source", h.address, "--vm", "ghost", "--out", join(dir, "x.dtt")]);
    assert.equal(noVm.code, EXIT["not-found"], noVm.err);
    assert.match(noVm.err, /no VM named 'ghost'/);
  });
});
