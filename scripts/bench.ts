/**
 * npm run bench: wall-clock throughput of the simulator's hot paths, printed
 * as a table with the issue's targets. Not a test: figures vary by machine.
 *
 *   --only NAME[,NAME]   run only some sections (hypervisor, datapath, ring, hardware, migration, workers, limits, scale, compare)
 *   --gib N              guest size for the hypervisor section (default 64)
 */
import { execFileSync, spawn } from "node:child_process";
import { monitorEventLoopDelay } from "node:perf_hooks";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { availableParallelism, loadavg, tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import * as grpc from "@grpc/grpc-js";
import { MemslotFlag, Workload, WorkloadPattern, type WriteMemoryRequest } from "../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { channelOptions } from "../common/grpc.js";
import { DEFAULT_COSTS } from "../services/hypervisor/model/cost-model.js";
import { Hdbss } from "../services/hypervisor/model/hdbss.js";
import { Pml } from "../services/hypervisor/model/pml.js";
import { CAP, Hypervisor, type CreateVmSpec } from "../services/hypervisor/model/hypervisor.js";
import { getDirtyLog } from "../services/hypervisor/model/dirty-bitmap.js";
import { harvestRing, resetDirtyRings } from "../services/hypervisor/model/dirty-ring.js";
import type { Vm } from "../services/hypervisor/model/vm.js";
import { IDLE, type WorkloadSpec } from "../services/hypervisor/model/workload.js";
import { spawnService } from "../common/spawn.js";
import { connectHypervisor, type HypervisorClient } from "../services/hypervisor/client.js";
import { createDemoVm, type GuestSpec } from "../clients/migration-controller/demo-vm.js";
import { DEFAULT_CONFIG, migrate } from "../clients/migration-controller/migrate.js";
import { runComparison } from "../clients/migration-controller/compare/run.js";
import type { Cell } from "../clients/migration-controller/compare/matrix.js";
import { QEMU_AUTO_CONVERGE } from "../clients/migration-controller/policies/auto-converge.js";
import { parseMechanism } from "../clients/migration-controller/trackers/index.js";
import { startHypervisor } from "../tests/hypervisor-harness.js";

const { values: args } = parseArgs({
  options: { only: { type: "string" }, gib: { type: "string", default: "64" }, "scale-gib": { type: "string", default: "4,16,64,256,1024" }, help: { type: "boolean" } },
});
if (args.help) {
  console.log("usage: npm run bench -- [--only hypervisor,datapath,ring,hardware,migration,workers,limits,scale,compare] [--gib 64] [--scale-gib 4,16,64,256,1024]");
  process.exit(0);
}
const only = args.only?.split(",");
const want = (name: string) => !only || only.includes(name);

const rows: { what: string; value: string; target: string }[] = [];
function report(what: string, value: string, target = "") {
  rows.push({ what, value, target });
  console.log(`  ${what.padEnd(64)} ${value.padStart(16)}  ${target}`);
}
const ms = (t0: bigint) => Number(process.hrtime.bigint() - t0) / 1e6;
const fmt = (n: number, digits = 1) => n.toLocaleString("en-US", { maximumFractionDigits: digits });

function workload(pattern: WorkloadSpec["pattern"], writesPerSecond: number, seed = 1n): WorkloadSpec {
  return { ...IDLE, pattern, writesPerSecond, seed };
}

const benchHypervisor = () => new Hypervisor({ memoryBudgetBytes: 2 ** 41, costs: { ...DEFAULT_COSTS }, allowFaultInjection: false });

/** A one-vCPU, stepped, 4 KiB-backed, logging VM with one slot at 1 GiB, for in-process benchmarks. */
function benchVm(hv: Hypervisor, name: string, bytes: number, extra: Partial<CreateVmSpec> = {}): Vm {
  return hv.createVm({
    name,
    vcpus: 1,
    memslots: [{ slot: 0, gpa: 2 ** 30, size: bytes, flags: MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES }],
    backing: "4K",
    ipaBits: 48,
    eagerSplitChunkSize: 0,
    clock: "stepped",
    realtimeSpeed: 1,
    seed: 1n,
    workload: null,
    startPaused: false,
    tlbEntries: 1024,
    dirtyRing: null,
    arch: "arm64",
    pml: false,
    ...extra,
  });
}

/**
 * Runs the VM's single vCPU for about `writes` writes at the fastest rate the
 * cost model allows (guestNsPerWrite of guest time each); returns writes per
 * second of wall time: the simulator's throughput.
 */
function timeWrites(vm: Vm, writes: number, guestNsPerWrite: number): { perSecond: number; faults: number } {
  const t0 = process.hrtime.bigint();
  vm.advance(writes * guestNsPerWrite);
  const elapsed = ms(t0);
  const v = vm.vcpus[0];
  return { perSecond: (v.step.writes / elapsed) * 1e3, faults: v.step.writeFaults };
}

/** The median of n runs (this machine shares its cores; single runs swing by 30%). */
function median<T>(n: number, run: () => T, key: (t: T) => number): T {
  const rs = Array.from({ length: n }, run).sort((x, y) => key(x) - key(y));
  return rs[n >> 1];
}

async function hypervisorBench(gib: number) {
  console.log(`\nhypervisor: ${gib} GiB guest (${fmt((gib * 2 ** 30) / 4096, 0)} pages), one vCPU`);
  const pages = (gib * 2 ** 30) / 4096;
  const hv = benchHypervisor();
  global.gc?.();
  const rss0 = process.memoryUsage().rss;
  const vm = benchVm(hv, "bench", gib * 2 ** 30);
  // Touch every page once (sequential): maps and logs all of them.
  vm.setWorkload(0, workload("sequential", 1e9 / DEFAULT_COSTS.writeNs));
  let t0 = process.hrtime.bigint();
  vm.advance(pages * (DEFAULT_COSTS.writeNs + DEFAULT_COSTS.translationFaultNs) + 1);
  const populateMs = ms(t0);
  report("populate: first write to every page (translation faults)", `${fmt(pages / populateMs / 1e3)} M/s`);
  global.gc?.();
  const rssPerPage = (process.memoryUsage().rss - rss0) / pages;
  report("resident bytes per guest page", `${fmt(rssPerPage, 2)} B`, "target <= 24");

  const all = median(
    3,
    () => {
      vm.advance(pages * (DEFAULT_COSTS.writeNs + DEFAULT_COSTS.writeFaultNs) + 1);
      const t = process.hrtime.bigint();
      const r = getDirtyLog(vm, 0);
      return { ms: ms(t), dirty: r.dirtyPages };
    },
    (r) => r.ms,
  );
  report("GET_DIRTY_LOG in process, all pages dirty (median of 3)", `${fmt(all.ms)} ms`, `(${fmt(all.dirty, 0)} pages; includes re-protecting them)`);

  // (b) right after write protection: every first write to a page faults.
  vm.setWorkload(0, workload("uniform", 1e9 / DEFAULT_COSTS.writeNs, 2n));
  const b = timeWrites(vm, 2_000_000, DEFAULT_COSTS.writeNs + DEFAULT_COSTS.writeFaultNs);
  report("guest writes/s, logging on, right after write protection", `${fmt(b.perSecond / 1e6, 2)} M/s`, `(${fmt(b.faults, 0)} faults)`);

  // (a) no write faults, on a VM of each architecture created for it (the process's first VM runs this loop about 15% slower
  // than any later one, whichever the architecture: measured on the same VM it made arm64, measured first, look slower than x86).
  const noFaults = async (arch: "arm64" | "x86_64") => {
    const v = benchVm(hv, `bench-${arch}`, gib * 2 ** 30, { arch });
    // Every page written once makes every page writable (all dirty); then uniform writes never fault.
    v.setWorkload(0, workload("sequential", 1e9 / DEFAULT_COSTS.writeNs));
    v.advance(pages * (DEFAULT_COSTS.writeNs + DEFAULT_COSTS.translationFaultNs) + 1);
    v.setWorkload(0, workload("uniform", 1e9 / DEFAULT_COSTS.writeNs, 3n));
    const r = median(5, () => timeWrites(v, 20_000_000, DEFAULT_COSTS.writeNs), (x) => x.perSecond);
    await hv.destroyVm(v.name);
    return r;
  };
  const a = await noFaults("arm64");
  report("guest writes/s, logging on, no write faults, arm64 (median of 5)", `${fmt(a.perSecond / 1e6, 2)} M/s`, `(${fmt(a.faults, 0)} faults)`);
  const ax = await noFaults("x86_64");
  report("the same on an x86_64 VM (median of 5)", `${fmt(ax.perSecond / 1e6, 2)} M/s`, `(${fmt(ax.faults, 0)} faults)`);
  const c = cWritesPerSecond(pages, 20_000_000);
  report(
    "the same write loop in C (cc -O2), same run, median of 5: batch, TLB check, writable bit, store",
    c === null ? "no cc" : `${fmt(c.algorithm / 1e6, 2)} M/s`,
    c === null ? "" : `plain C stores ${fmt(c.plain / 1e6, 1)} M/s`,
  );
  if (c !== null) {
    const ratio = (js: number) => `${fmt(js / c.algorithm, 2)}x`;
    report("  JS/C, no faults, arm64", ratio(a.perSecond), "target >= 0.4x");
    report("  JS/C, no faults, x86_64", ratio(ax.perSecond), "target >= 0.4x");
    report("  JS/C, every write faulting (right after write protection)", ratio(b.perSecond), "(for reference)");
  }

  getDirtyLog(vm, 0);
  vm.setWorkload(0, workload("uniform", 1e9 / DEFAULT_COSTS.writeNs, 4n));
  vm.advance(Math.round(pages * 0.01) * (DEFAULT_COSTS.writeNs + DEFAULT_COSTS.writeFaultNs));
  t0 = process.hrtime.bigint();
  const some = getDirtyLog(vm, 0);
  report("GET_DIRTY_LOG in process, ~1% dirty", `${fmt(ms(t0), 2)} ms`, `(${fmt(some.dirtyPages, 0)} pages)`);

  await hv.destroyVm("bench");
  global.gc?.();

  // Over gRPC: the same slot size in a server on 127.0.0.1 (in this process), client on a real channel.
  const h = await startHypervisor({ memoryBudgetBytes: 2 ** 41 });
  try {
    const c = h.client;
    await c.createVm({
      vm: "g",
      vcpus: 1,
      ipaBits: 48,
      memslots: [{ slot: 0, guestPhysAddr: BigInt(2 ** 30), memorySize: BigInt(gib * 2 ** 30), flags: MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES }],
      workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: 1e9 / DEFAULT_COSTS.writeNs },
    });
    // One pass of the sequential workload over the slot dirties every page (a fault each).
    const pass = BigInt(Math.ceil(pages * (DEFAULT_COSTS.writeNs + DEFAULT_COSTS.writeFaultNs)));
    const samples: number[] = [];
    let dirty = 0n;
    for (let i = 0; i < 5; i++) {
      await c.advanceVm({ vm: "g", durationNs: pass });
      t0 = process.hrtime.bigint();
      const r = await c.getDirtyLog({ vm: "g", slot: 0 });
      samples.push(ms(t0));
      dirty = r.dirtyPages;
    }
    samples.sort((x, y) => x - y);
    report(`GET_DIRTY_LOG over gRPC, all pages dirty (median of 5)`, `${fmt(samples[2])} ms`, `target < 60 ms (${fmt(Number(dirty), 0)} pages, ${fmt((pages / 8) / 2 ** 20, 0)} MiB bitmap)`);
    await c.setWorkload({ vm: "g", workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, writesPerSecond: 1e9 / DEFAULT_COSTS.writeNs, seed: 9n } });
    await c.advanceVm({ vm: "g", durationNs: BigInt(Math.round(pages * 0.01 * (DEFAULT_COSTS.writeNs + DEFAULT_COSTS.writeFaultNs))) });
    t0 = process.hrtime.bigint();
    const r = await c.getDirtyLog({ vm: "g", slot: 0 });
    report("GET_DIRTY_LOG over gRPC, ~1% dirty", `${fmt(ms(t0))} ms`, `(${fmt(Number(r.dirtyPages), 0)} pages)`);
  } finally {
    await h.close();
  }
}

/**
 * A 16 GiB VM with 8 vCPUs writing 1 GiB/s (262,144 page writes/s, hot/cold)
 * migrated at 10 Gbit/s in the stepped drive, hypervisors in their own
 * processes: wall-clock time against simulated migration time.
 */
/**
 * A guest as the demo creates it (createDemoVm): 8 vCPUs, every page touched
 * first until all are mapped, however much a first touch costs in the cost
 * model (a fixed advance once left most of them unwritten, so round 0 sent
 * zero pages), then hot/cold writes: 90% of them to hotFraction of memory.
 */
async function populatedGuest(hv: HypervisorClient, name: string, bytes: number, writesPerSecondPerVcpu: number, hotFraction: number): Promise<void> {
  const workload = Workload.fromPartial({ pattern: WorkloadPattern.WORKLOAD_PATTERN_HOT_COLD, writesPerSecond: writesPerSecondPerVcpu, hotFraction, hotWriteFraction: 0.9 });
  const guest: GuestSpec = { memoryBytes: bytes, vcpus: 8, arch: "arm64", backing: "4k", workload, noisyWritesPerSecond: null, vcpuWorkloads: null, seed: 1, ringEntries: 4096 };
  await createDemoVm(hv, name, guest, parseMechanism("bitmap"));
}

async function migrationBench() {
  console.log("\nmigration: 16 GiB, 8 vCPUs, 1 GiB/s of guest writes (hot/cold), 10 Gbit/s, stepped clock");
  const env = { HYPERVISOR_GRPC_PORT: "0", HYPERVISOR_HTTP_PORT: "0", HYPERVISOR_ANNOUNCE: "1" };
  const [a, b] = await Promise.all([spawnService("services/hypervisor/main.ts", env), spawnService("services/hypervisor/main.ts", env)]);
  const source = connectHypervisor(a.address);
  const destination = connectHypervisor(b.address);
  try {
    await populatedGuest(source, "big", 16 * 2 ** 30, 2 ** 30 / 4096 / 8, 0.05);
    const r = await migrate({ sourceVm: "big", destinationVm: "big" }, { source, destination });
    report("simulated migration time", `${fmt(r.totalTimeMs / 1e3, 2)} s`, `(${r.dirtySyncCount} syncs, downtime ${fmt(r.downtimeMs ?? 0)} ms, verified ${r.verification?.match})`);
    report("wall-clock time of the migration", `${fmt(r.wallTimeMs / 1e3, 2)} s`);
    report("speed against real time", `${fmt(r.totalTimeMs / r.wallTimeMs)}x`, "target >= 10x");
  } finally {
    source.close();
    destination.close();
    await Promise.all([a.stop(), b.stop()]);
  }
}

/**
 * VM worker threads (HYPERVISOR_VM_WORKERS): one migration, and two at once
 * between the same two hypervisors (two VMs on each), with the VMs on the
 * gRPC thread and in two workers; the same populated guests and workload as
 * the migration section, at 4 GiB, then the 16 GiB case alone. Every
 * migration must verify, and each size's results must not depend on the
 * threading (the same digest, syncs and simulated time).
 */
async function workersBench() {
  console.log(`\nVM worker threads: migrations of 8-vCPU guests dirtying 1 GiB/s (hot/cold) over 10 Gbit/s, stepped clock, on ${availableParallelism()} CPUs`);
  type Outcome = { wallMs: number; simulated: string };
  const run = async (workers: number, gib: number, concurrent: number): Promise<Outcome> => {
    const env = { HYPERVISOR_GRPC_PORT: "0", HYPERVISOR_HTTP_PORT: "0", HYPERVISOR_ANNOUNCE: "1", HYPERVISOR_VM_WORKERS: String(workers) };
    const [a, b] = await Promise.all([spawnService("services/hypervisor/main.ts", env), spawnService("services/hypervisor/main.ts", env)]);
    const source = connectHypervisor(a.address, { deadlineMs: 600_000 });
    const destination = connectHypervisor(b.address, { deadlineMs: 600_000 });
    try {
      const names = Array.from({ length: concurrent }, (_, i) => `vm${i}`);
      await Promise.all(names.map((n) => populatedGuest(source, n, gib * 2 ** 30, 2 ** 30 / 4096 / 8, 0.05)));
      const t0 = performance.now();
      const rs = await Promise.all(names.map((n) => migrate({ sourceVm: n, destinationVm: n }, { source, destination })));
      const wallMs = performance.now() - t0;
      const bad = rs.filter((r) => r.status !== "completed" || !r.verification?.match);
      if (bad.length) throw new Error(`${bad.length} of ${rs.length} migrations did not complete and verify`);
      return { wallMs, simulated: rs.map((r) => `${r.verification?.sourceSha256} ${r.dirtySyncCount} ${r.totalTimeMs}`).join(";") };
    } finally {
      source.close();
      destination.close();
      await Promise.all([a.stop(), b.stop()]);
    }
  };
  const same = (x: Outcome, y: Outcome, what: string) => {
    if (x.simulated.split(";")[0] !== y.simulated.split(";")[0]) throw new Error(`${what}: the results depend on the threading (${x.simulated} against ${y.simulated})`);
  };
  const one0 = await run(0, 4, 1);
  const two0 = await run(0, 4, 2);
  const one2 = await run(2, 4, 1);
  const two2 = await run(2, 4, 2);
  [two0, one2, two2].forEach((o) => same(one0, o, "4 GiB"));
  report("4 GiB: one migration, VMs on the gRPC thread / in 2 workers", `${fmt(one0.wallMs / 1e3, 2)} / ${fmt(one2.wallMs / 1e3, 2)} s`);
  report("4 GiB: two at once, VMs on the gRPC thread", `${fmt(two0.wallMs / 1e3, 2)} s`, `${fmt(two0.wallMs / one0.wallMs, 2)}x one`);
  report("4 GiB: two at once, VMs in 2 workers", `${fmt(two2.wallMs / 1e3, 2)} s`, `${fmt(two2.wallMs / one2.wallMs, 2)}x one; target <= 1.2x`);
  const big0 = await run(0, 16, 1);
  const big2 = await run(2, 16, 1);
  same(big0, big2, "16 GiB");
  report("16 GiB alone: VMs on the gRPC thread / in 2 workers", `${fmt(big0.wallMs / 1e3, 2)} / ${fmt(big2.wallMs / 1e3, 2)} s`, `${fmt(big0.wallMs / big2.wallMs, 2)}x faster in workers; target > 1x`);
}

/**
 * Dirty rings: push (the fault path included), harvest and reset per entry in
 * process, and entries harvested per second over gRPC, for 65536-entry rings.
 */
/**
 * The data path against a bare grpc-js stream of the same messages in the
 * same process: ReadMemory of a whole guest in 2 MiB messages against a
 * server stream of 2 MiB Buffers, WriteMemory against a client stream of
 * them (identity serialization, the same channel options). Median of 5
 * each, after two runs to warm up.
 */
async function datapathBench(gib: number) {
  const MSG = 2 ** 21;
  const messages = (gib * 2 ** 30) / 4096 / (MSG / 8);
  console.log(`\ndata path: ${gib} GiB guest, ${messages} messages of 2 MiB each way, against bare grpc-js`);
  const h = await startHypervisor({ memoryBudgetBytes: 2 ** 41 });
  const identity = (b: Buffer) => b;
  const payload = Buffer.alloc(MSG, 7);
  const bare = new grpc.Server(channelOptions);
  bare.addService(
    {
      read: { path: "/bare.Bare/Read", requestStream: false, responseStream: true, requestSerialize: identity, requestDeserialize: identity, responseSerialize: identity, responseDeserialize: identity },
      write: { path: "/bare.Bare/Write", requestStream: true, responseStream: false, requestSerialize: identity, requestDeserialize: identity, responseSerialize: identity, responseDeserialize: identity },
    },
    {
      read: async (call: grpc.ServerWritableStream<Buffer, Buffer>) => {
        for (let i = 0; i < messages; i++) if (!call.write(payload)) await new Promise((r) => call.once("drain", r));
        call.end();
      },
      write: (call: grpc.ServerReadableStream<Buffer, Buffer>, done: grpc.sendUnaryData<Buffer>) => {
        call.on("data", () => undefined);
        call.on("end", () => done(null, Buffer.alloc(0)));
      },
    },
  );
  const port = await new Promise<number>((resolve, reject) => bare.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (e, p) => (e ? reject(e) : resolve(p))));
  const client = new grpc.Client(`127.0.0.1:${port}`, grpc.credentials.createInsecure(), channelOptions);
  // Two runs of each to warm the JIT, then seven pairs, ours and the bare one back to back so that
  // both see the same load and GC state: the medians, and the median of the pairs' ratios.
  const median = (xs: number[]) => [...xs].sort((x, y) => x - y)[xs.length >> 1];
  const timed = async (run: () => Promise<unknown>) => {
    const t = performance.now();
    await run();
    return performance.now() - t;
  };
  const compare = async (what: string, ours: () => Promise<unknown>, bare: () => Promise<unknown>) => {
    for (let i = 0; i < 2; i++) {
      await ours();
      await bare();
    }
    const a: number[] = [];
    const b: number[] = [];
    for (let i = 0; i < 7; i++) {
      a.push(await timed(ours));
      b.push(await timed(bare));
    }
    const ratio = median(a.map((x, i) => x / b[i]));
    report(what, `${fmt(median(a), 0)} / ${fmt(median(b), 0)} ms`, `${fmt(ratio, 2)}x (median of 7 back-to-back pairs), target <= 1.3x`);
  };
  try {
    const c = h.client;
    await c.createVm({ vm: "dp", vcpus: 1, memslots: [{ slot: 0, guestPhysAddr: BigInt(2 ** 30), memorySize: BigInt(gib * 2 ** 30) }] });
    await c.createVm({ vm: "dp-dst", vcpus: 1, memslots: [{ slot: 0, guestPhysAddr: BigInt(2 ** 30), memorySize: BigInt(gib * 2 ** 30) }] });
    let chunks: WriteMemoryRequest[] = [];
    await compare(
      "ReadMemory of the whole guest / the bare stream",
      async () => {
        chunks = [];
        for await (const r of c.readMemory({ vm: "dp", slot: 0, chunkPages: MSG / 8 }, { deadlineMs: 600_000 })) chunks.push({ vm: "dp-dst", chunk: r.chunk });
      },
      () =>
        new Promise<void>((resolve, reject) => {
          const s = client.makeServerStreamRequest("/bare.Bare/Read", identity, identity, Buffer.alloc(0));
          s.on("data", () => undefined);
          s.on("end", () => resolve());
          s.on("error", reject);
        }),
    );
    await compare(
      "WriteMemory of the whole guest / the bare stream",
      () => c.writeMemory(chunks, { deadlineMs: 600_000 }),
      () =>
        new Promise<void>((resolve, reject) => {
          const s = client.makeClientStreamRequest("/bare.Bare/Write", identity, identity, (e) => (e ? reject(e) : resolve()));
          let i = 0;
          const pump = () => {
            while (i < messages) {
              i++;
              if (!s.write(payload)) return void s.once("drain", pump);
            }
            s.end();
          };
          pump();
        }),
    );
  } finally {
    client.close();
    bare.forceShutdown();
    await h.close();
  }
}

/** A process's peak resident set (VmHWM), in bytes; 0 where /proc is not there. */
function peakRss(pid: number | undefined): number {
  try {
    const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
    return m ? Number(m[1]) * 1024 : 0;
  } catch {
    return 0;
  }
}

/**
 * Migration cost against guest size: the same workload (8 vCPUs, 10,000
 * writes/s each, 90% of them into a fixed 200 MiB hot set) on guests of 4 GiB
 * to 1 TiB laid out as the demo lays them out, over 10 Gbit/s, each on two
 * fresh hypervisor processes; the wall time's exponent fitted in log-log, and
 * each process's peak memory at 1 TiB.
 */
async function scaleBench(sizesGiB: number[]) {
  console.log(`\nscale: ${sizesGiB.join(", ")} GiB, 8 vCPUs, 80,000 writes/s into a 200 MiB hot set, 10 Gbit/s`);
  const env = { HYPERVISOR_GRPC_PORT: "0", HYPERVISOR_HTTP_PORT: "0", HYPERVISOR_ANNOUNCE: "1" };
  const points: [number, number][] = [];
  for (const gib of sizesGiB) {
    const bytes = gib * 2 ** 30;
    const [a, b] = await Promise.all([spawnService("services/hypervisor/main.ts", env), spawnService("services/hypervisor/main.ts", env)]);
    const source = connectHypervisor(a.address, { deadlineMs: 3_600_000 });
    const destination = connectHypervisor(b.address, { deadlineMs: 3_600_000 });
    let controllerPeak = process.memoryUsage().rss;
    const sampler = setInterval(() => (controllerPeak = Math.max(controllerPeak, process.memoryUsage().rss)), 200);
    try {
      const t0 = performance.now();
      await populatedGuest(source, "scale", bytes, 10_000, 51200 / (bytes / 4096));
      const setupMs = performance.now() - t0;
      const r = await migrate({ sourceVm: "scale", destinationVm: "scale", rpcTimeoutMs: 600_000 }, { source, destination });
      points.push([gib, r.wallTimeMs]);
      report(
        `${gib} GiB: migration wall time (simulated ${fmt(r.totalTimeMs / 1e3, 1)} s, ${r.dirtySyncCount} syncs, verified ${r.verification?.match})`,
        `${fmt(r.wallTimeMs / 1e3, 2)} s`,
        `${fmt(r.totalTimeMs / r.wallTimeMs, 1)}x real time; setup ${fmt(setupMs / 1e3, 1)} s; peak RSS source / destination / controller ${[peakRss(a.proc.pid), peakRss(b.proc.pid), controllerPeak].map((x) => fmt(x / 2 ** 30, 2)).join(" / ")} GiB`,
      );
    } finally {
      clearInterval(sampler);
      source.close();
      destination.close();
      await Promise.all([a.stop(), b.stop()]);
    }
  }
  if (points.length >= 2) {
    const xs = points.map(([g]) => Math.log(g));
    const ys = points.map(([, ms]) => Math.log(ms));
    const mx = xs.reduce((x, y) => x + y, 0) / xs.length;
    const my = ys.reduce((x, y) => x + y, 0) / ys.length;
    const slope = xs.reduce((n, x, i) => n + (x - mx) * (ys[i] - my), 0) / xs.reduce((n, x) => n + (x - mx) ** 2, 0);
    report(`wall time ~ size^k, k fitted over ${sizesGiB[0]} GiB to ${sizesGiB.at(-1)} GiB`, fmt(slope, 3), "target <= 1.05");
  }
}

async function ringBench() {
  console.log("\ndirty ring: 65536 entries (1 MiB) per vCPU, one vCPU writing distinct pages");
  const bytes = 4 * 2 ** 30;
  const vm = benchVm(benchHypervisor(), "ring", bytes, {
    workload: workload("sequential", 1e9 / DEFAULT_COSTS.writeNs),
    dirtyRing: { capability: 223, bytes: 65536n * 16n, withBitmap: false },
  });
  const fill = () => vm.advance(65536 * (DEFAULT_COSTS.writeNs + DEFAULT_COSTS.writeFaultNs) * 2);
  fill(); // warm up the JIT and map the pages once
  harvestRing(vm, 0, 0);
  resetDirtyRings(vm);
  const rounds = 5;
  let push = 0;
  let harvest = 0;
  let reset = 0;
  let entries = 0;
  for (let i = 0; i < rounds; i++) {
    let t = process.hrtime.bigint();
    fill();
    push += ms(t);
    t = process.hrtime.bigint();
    const h = harvestRing(vm, 0, 0);
    harvest += ms(t);
    t = process.hrtime.bigint();
    const r = resetDirtyRings(vm);
    reset += ms(t);
    if (r.cleared !== h.count) throw new Error(`reset ${r.cleared} != harvested ${h.count}`);
    entries += h.count;
  }
  const per = (x: number) => `${fmt((x * 1e6) / entries)} ns`;
  report(`push per entry (write + fault + push; ${fmt(entries / rounds, 0)} entries to the soft limit)`, per(push));
  report("harvest per entry (in process)", per(harvest));
  report("reset per entry (re-protect, coalesced)", per(reset));
  report("push + harvest + reset per entry", per(push + harvest + reset));

  const h = await startHypervisor({ memoryBudgetBytes: 2 ** 41 });
  try {
    await h.client.createVm({
      vm: "ring",
      vcpus: 1,
      dirtyRing: { capability: 223, bytes: 65536n * 16n },
      memslots: [{ slot: 0, guestPhysAddr: BigInt(2 ** 30), memorySize: BigInt(bytes), flags: MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES }],
      workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: 1e9 / DEFAULT_COSTS.writeNs },
    });
    let total = 0;
    let wall = 0;
    for (let i = 0; i < rounds; i++) {
      await h.client.advanceVm({ vm: "ring", durationNs: BigInt(65536 * 2 * (DEFAULT_COSTS.writeNs + DEFAULT_COSTS.writeFaultNs)) });
      const t = process.hrtime.bigint();
      const r = await h.client.harvestDirtyRing({ vm: "ring", vcpu: 0 });
      wall += ms(t);
      total += r.count;
      await h.client.resetDirtyRings({ vm: "ring" });
    }
    report("entries harvested per second over gRPC (whole ring per call)", `${fmt(total / wall / 1e3, 2)} M/s`, `(${fmt(total / rounds, 0)} entries, 16 B each, per call)`);
  } finally {
    await h.close();
  }
}

/** Compiles a C program (source as a string) with cc -O2 and runs it; its stdout, or null without a C compiler. */
function runC(source: string): string | null {
  const dir = mkdtempSync(join(tmpdir(), "c-"));
  const src = join(dir, "prog.c");
  writeFileSync(src, source);
  try {
    execFileSync("cc", ["-O2", "-o", join(dir, "prog"), src], { stdio: "ignore" });
    return execFileSync(join(dir, "prog")).toString();
  } catch {
    return null;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * The model's write loop with no faults, written in C: sfc32 page indices in
 * batches of 1024 (uniform over the pages), the direct-mapped TLB of 1024
 * doubles, the writable bit on a miss, the 8-byte content store, the time
 * step; and plain stores to the same pages, for reference. Writes per second
 * (best of 5), or null without a C compiler.
 */
function cWritesPerSecond(pages: number, writes: number): { algorithm: number; plain: number } | null {
  const out = runC(`#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <time.h>
static uint32_t a=1,b=0,c=0x9e3779b9,d=1;
static uint32_t sfc(void){uint32_t t=a+b+d;d++;a=b^(b>>9);b=c+(c<<3);c=(c<<21)|(c>>11);c+=t;return t;}
static double now(void){struct timespec s;clock_gettime(CLOCK_MONOTONIC,&s);return s.tv_sec+s.tv_nsec/1e9;}
static int cmp(const void*x,const void*y){double a=*(const double*)x,b=*(const double*)y;return (a>b)-(a<b);}
int main(void){size_t n=${pages};long w=${writes};
uint32_t*content=calloc(2*n,4);int32_t*writable=malloc((n/32+1)*4);double*tlb=malloc(1024*8);uint32_t batch[1024];
for(size_t i=0;i<n/32+1;i++)writable[i]=-1;for(int i=0;i<1024;i++)tlb[i]=-1;
for(int i=0;i<15;i++)sfc();
double alg[5],pl[5];uint64_t seq=0;
for(int r=0;r<5;r++){double t0=now();double t=0,until=w*15.0;int cur=1024;long done=0;
 while(t<until){if(cur==1024){for(int i=0;i<1024;i++)batch[i]=(uint32_t)((sfc()/4294967296.0)*n);cur=0;}
  uint32_t p=batch[cur++];double gfn=262144.0+p;int ti=((int64_t)gfn)&1023;
  if(tlb[ti]!=gfn){if((writable[p>>5]>>(p&31))&1)tlb[ti]=gfn;}
  seq++;content[2*p]=(uint32_t)seq;content[2*p+1]=(uint32_t)(seq>>32);t+=15.0;done++;}
 alg[r]=done/(now()-t0);
 t0=now();for(long i=0;i<w;i++){uint32_t p=(uint32_t)((sfc()/4294967296.0)*n);content[2*p]=(uint32_t)i;}
 pl[r]=w/(now()-t0);}
qsort(alg,5,sizeof(double),cmp);qsort(pl,5,sizeof(double),cmp);
printf("%f %f %u\\n",alg[2],pl[2],content[2]);return 0;}
`);
  if (out === null) return null;
  const [algorithm, plain] = out.split(" ").map(Number);
  return { algorithm, plain };
}

/**
 * The DBM dirty-state scan in C over the same data structures as the model's
 * two scans, with every page writable (S2AP_W set), into a clean bitmap: the
 * bit plane of the walk cache (one bit a page, Stage2.scanDirtyInto) and the
 * descriptors' low words (4 bytes a page, Stage2.scanDescriptorsInto), with
 * the same loops. Best
 * of 5 in ms each; null without a C compiler.
 */
function cScanMs(pages: number): { plane: number; descriptors: number } | null {
  const out = runC(
    `#include <stdio.h>\n#include <stdlib.h>\n#include <stdint.h>\n#include <time.h>\n` +
      `static double ms(struct timespec a,struct timespec b){return (b.tv_sec-a.tv_sec)*1e3+(b.tv_nsec-a.tv_nsec)/1e6;}` +
      `int main(void){size_t n=${pages};int32_t*lo=malloc(n*4);int32_t*w=malloc(n/32*4);int32_t*bm=malloc(n/32*4);long found=0;` +
      `for(size_t i=0;i<n;i++)lo[i]=0x4c3|0x80;for(size_t i=0;i<n/32;i++)w[i]=-1;double bp=1e9,bd=1e9;` +
      `for(int r=0;r<5;r++){struct timespec a,b;for(size_t i=0;i<n/32;i++)bm[i]=0;clock_gettime(CLOCK_MONOTONIC,&a);long k=0;` +
      `for(size_t i=0;i<n/32;i++){uint32_t d=w[i]&~bm[i];if(!d)continue;bm[i]|=d;k+=d==0xffffffffu?32:__builtin_popcount(d);}` +
      `clock_gettime(CLOCK_MONOTONIC,&b);if(ms(a,b)<bp)bp=ms(a,b);found+=k;` +
      `for(size_t i=0;i<n/32;i++)bm[i]=0;clock_gettime(CLOCK_MONOTONIC,&a);k=0;` +
      `for(size_t i=0;i<n/32;i++){uint32_t m=0;for(int j=0;j<32;j++)m|=(((uint32_t)lo[i*32+j]>>7)&1u)<<j;uint32_t d=m&~bm[i];if(!d)continue;bm[i]|=d;k+=d==0xffffffffu?32:__builtin_popcount(d);}` +
      `clock_gettime(CLOCK_MONOTONIC,&b);if(ms(a,b)<bd)bd=ms(a,b);found+=k;}` +
      `printf("%f %f %ld\\n",bp,bd,found);return 0;}\n`,
  );
  if (out === null) return null;
  const [plane, descriptors] = out.split(" ").map(Number);
  return { plane, descriptors };
}

/**
 * A per-vCPU hardware log (HDBSS, PML) on vm's one vCPU: a pass in which the
 * first writes fault, a GET (now every page is writable-clean), a pass of
 * hardware updates into the log with its traps when full, and the drain per
 * entry at GET of a log that holds 500 entries (median of 9).
 */
function hardwareLogBench(vm: Vm, pages: number, entryNs: number, what: string, traps: string, trapStat: "hdbssFullFaults" | "pmlFullExits", drainWhat: string) {
  const slot = vm.slots.get(0)!;
  vm.advance(pages * (DEFAULT_COSTS.writeNs + DEFAULT_COSTS.translationFaultNs) + 1);
  getDirtyLog(vm, 0);
  const perWrite = DEFAULT_COSTS.writeNs + DEFAULT_COSTS.dbmUpdateNs + entryNs;
  const t0 = process.hrtime.bigint();
  vm.advance(pages * perWrite + 1);
  const passMs = ms(t0);
  const v = vm.vcpus[0];
  report(`guest writes/s with ${what} (every write a hardware update, ${fmt(v.step[trapStat], 0)} ${traps})`, `${fmt(v.step.writes / passMs / 1e3, 2)} M/s`);
  const drain = median(
    9,
    () => {
      getDirtyLog(vm, 0); // drains, and makes every page writable-clean again
      vm.advance(500 * perWrite);
      const entries = vm.hw instanceof Hdbss || vm.hw instanceof Pml ? vm.hw.used[0] : 0;
      const t = process.hrtime.bigint();
      vm.arch.syncDirtyLog(vm, slot);
      return { ns: Number(process.hrtime.bigint() - t) / Math.max(1, entries), entries };
    },
    (r) => r.ns,
  );
  report(`${drainWhat} per entry at GET (${fmt(drain.entries, 0)} entries, median of 9)`, `${fmt(drain.ns, 0)} ns`);
}

/** Hardware DBM's descriptor scan of a 64 GiB guest, and the device's ReadDirty throughput over gRPC. */
async function hardwareBench(gib: number) {
  const pages = (gib * 2 ** 30) / 4096;
  console.log(`\nhardware DBM, FEAT_HDBSS, Intel PML and the page-tracking device (${gib} GiB guest)`);
  const hv = benchHypervisor();
  const vm = benchVm(hv, "dbm", gib * 2 ** 30, {
    memslots: [{ slot: 0, gpa: 2 ** 30, size: gib * 2 ** 30, flags: 0 }],
    workload: workload("sequential", 1e9 / DEFAULT_COSTS.writeNs),
  });
  vm.advance(pages * (DEFAULT_COSTS.writeNs + DEFAULT_COSTS.translationFaultNs) + 1); // every page writable
  hv.enableCap(vm, CAP.ARM_HW_DIRTY_LOG, 0, [1n]);
  const slot = vm.slots.get(0)!;
  vm.setSlotFlags(slot, MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES); // DBM on every page, all writable-clean
  vm.advance(pages * (DEFAULT_COSTS.writeNs + DEFAULT_COSTS.dbmUpdateNs) + 1); // hardware dirties every page, no fault
  report("hardware clean -> dirty updates (no faults) in the last pass", fmt(vm.hwDirtyUpdates, 0), `(${fmt(vm.vcpus[0].step.writeFaults, 0)} faults)`);
  // Best of 9 after the JIT has warmed up, as the C side reports its best of 5.
  const best = (scanInto: (bm: Int32Array) => number) => {
    let out = { ms: Infinity, found: 0 };
    for (let r = 0; r < 9; r++) {
      const bm = new Int32Array(slot.dirtyBitmap!.length).fill(0); // touched before the clock starts, as in C
      const t = process.hrtime.bigint();
      const found = scanInto(bm);
      const took = ms(t);
      if (took < out.ms) out = { ms: took, found };
    }
    return out;
  };
  const scan = best((bm) => slot.s2.scanDirtyInto(bm));
  report(`DBM dirty-state scan of ${gib} GiB (best of 9)`, `${fmt(scan.ms, 2)} ms`, `(${fmt(scan.found, 0)} pages; the walk cache's bit plane)`);
  const descriptors = best((bm) => slot.s2.scanDescriptorsInto(bm)).ms;
  report("the same scan reading the descriptors' low words (best of 9)", `${fmt(descriptors, 2)} ms`, "(the kernel figure is 40 ms per 64 GB)");
  const c = cScanMs(pages);
  if (c !== null) {
    report("  the same two scans in C (cc -O2), best of 5", `${fmt(c.plane, 2)} / ${fmt(c.descriptors, 2)} ms`, "bit plane / descriptors' low words");
    report("  JS/C, bit-plane scan (the model's)", `${fmt(scan.ms / c.plane, 2)}x`, "target <= 2x");
    report("  JS/C, descriptor scan", `${fmt(descriptors / c.descriptors, 2)}x`, "target <= 2x");
  }
  await hv.destroyVm("dbm");

  // The per-vCPU hardware logs with 512 entries: FEAT_HDBSS on arm64, Intel PML on x86_64.
  const hd = benchVm(hv, "hdbss", gib * 2 ** 30, { workload: workload("sequential", 1e9 / DEFAULT_COSTS.writeNs) });
  hv.enableCap(hd, CAP.ARM_HW_DIRTY_STATE_TRACK, 0, [0n, 1n]);
  hardwareLogBench(hd, pages, DEFAULT_COSTS.hdbssEntryNs, "HDBSS logging", "buffer-full faults", "hdbssFullFaults", "HDBSS flush");
  await hv.destroyVm("hdbss");
  const px = benchVm(hv, "pml", gib * 2 ** 30, { workload: workload("sequential", 1e9 / DEFAULT_COSTS.writeNs), arch: "x86_64", pml: true });
  hardwareLogBench(px, pages, DEFAULT_COSTS.pmlLogNs, "PML logging on x86", "PML-full exits", "pmlFullExits", "PML drain");
  await hv.destroyVm("pml");

  const { startDevice } = await import("../tests/hypervisor-harness.js");
  const { gpasToBytes } = await import("../services/page-tracking-device/client.js");
  const d = await startDevice({ logCapacity: 1 << 23 });
  try {
    const { tracker } = await d.client.allocateTracker({ vmid: 1 });
    await d.client.enableTracking({ tracker, cpu: -1 });
    const n = 1 << 22;
    const call = d.client.reportWrites();
    const acked = new Promise<void>((resolve, reject) => {
      call.on("data", (r) => r.ackedSeq === 16n && resolve());
      call.on("error", reject);
    });
    for (let b = 0; b < 16; b++) {
      const gpas = Array.from({ length: n / 16 }, (_, i) => 2 ** 30 + (b * (n / 16) + i) * 4096);
      call.write({ vmid: 1, cpu: b % 4, seq: BigInt(b + 1), gpas: gpasToBytes(gpas) });
    }
    await acked;
    call.end();
    await d.client.flush({ tracker });
    let got = 0;
    const t = process.hrtime.bigint();
    for (;;) {
      const r = await d.client.readDirty({ tracker, cpu: -1, max: 1 << 20 });
      if (r.count === 0) break;
      got += r.count;
    }
    const elapsed = ms(t);
    report(`device ReadDirty over gRPC (${fmt(got, 0)} GPAs, 1 Mi per call, bytes)`, `${fmt(got / elapsed / 1e3, 1)} M GPAs/s`, "target >= 10 M/s");
  } finally {
    await d.close();
  }
}

/**
 * What one client can cost a server: the device's bytes per tracked GPA, the
 * longest event-loop stall while a 64 GiB guest advances, and the server's
 * memory with 40 ReadMemory streams that a client opened and never reads.
 */
async function limitsBench(gib: number) {
  console.log(`\nbounds on what one client costs a server`);
  const { startDevice } = await import("../tests/hypervisor-harness.js");
  const { gpasToBytes } = await import("../services/page-tracking-device/client.js");
  const d = await startDevice({ logCapacity: 1 << 22 });
  try {
    const { tracker } = await d.client.allocateTracker({ vmid: 1 });
    await d.client.enableTracking({ tracker, cpu: -1 });
    let x = 12345;
    const n = 1_000_000;
    const gpas = Array.from({ length: n }, () => {
      x = (Math.imul(x, 1103515245) + 12345) >>> 0;
      return ((x * 65521 + (x >>> 7)) % 2 ** 36) * 4096;
    });
    const call = d.client.reportWrites();
    const acked = new Promise<void>((resolve, reject) => {
      call.on("data", (r) => r.ackedSeq === 100n && resolve());
      call.on("error", reject);
    });
    for (let b = 0; b < 100; b++) call.write({ vmid: 1, cpu: b % 8, seq: BigInt(b + 1), gpas: gpasToBytes(gpas.slice(b * 10_000, (b + 1) * 10_000)) });
    await acked;
    call.end();
    await d.client.flush({ tracker });
    report(`device: bytes per tracked GPA (${fmt(n, 0)} sparse GPAs below 2^48: buffers, log, set)`, `${fmt(d.device.allocatedBytes / n, 1)} B`, "small constant");
  } finally {
    await d.close();
  }

  const h = await startHypervisor({ memoryBudgetBytes: 2 ** 41 });
  try {
    const c = h.client;
    const pages = (gib * 2 ** 30) / 4096;
    await c.createVm({
      vm: "stall",
      vcpus: 1,
      memslots: [{ slot: 0, guestPhysAddr: BigInt(2 ** 30), memorySize: BigInt(gib * 2 ** 30), flags: MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES }],
      workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: 1e9 / DEFAULT_COSTS.writeNs },
    });
    const loop = monitorEventLoopDelay({ resolution: 1 });
    let worstRpc = 0;
    let probing = true;
    const probe = (async () => {
      while (probing) {
        const t = performance.now();
        await c.listVms({});
        worstRpc = Math.max(worstRpc, performance.now() - t);
        await new Promise((r) => setTimeout(r, 5));
      }
    })();
    loop.enable();
    const t0 = performance.now();
    await c.advanceVm({ vm: "stall", durationNs: BigInt(Math.ceil(pages * (DEFAULT_COSTS.writeNs + DEFAULT_COSTS.translationFaultNs))) }, { deadlineMs: 600_000 });
    const wall = performance.now() - t0;
    loop.disable();
    probing = false;
    await probe;
    report(`longest event-loop stall while AdvanceVm writes every page of ${gib} GiB (${fmt(wall / 1e3, 2)} s)`, `${fmt(loop.max / 1e6, 1)} ms`, `slices of 10 ms; p99 ${fmt(loop.percentile(99) / 1e6, 1)} ms`);
    report("slowest ListVms answered meanwhile", `${fmt(worstRpc, 1)} ms`);
    await c.destroyVm({ vm: "stall" });

    // 40 ReadMemory streams of the guest in 8 MiB messages that a client in another process never reads.
    await c.createVm({ vm: "unread", vcpus: 1, memslots: [{ slot: 0, guestPhysAddr: BigInt(2 ** 30), memorySize: BigInt(gib * 2 ** 30) }] });
    const perStream = Math.ceil(pages / 1048576);
    global.gc?.();
    const before = process.memoryUsage();
    const client = spawn(
      process.execPath,
      [
        "--import",
        "tsx",
        "--input-type=module",
        "-e",
        `import { connectHypervisor } from "./services/hypervisor/client.js";
         const c = connectHypervisor(${JSON.stringify(h.address)});
         const its = Array.from({ length: 40 }, () => c.readMemory({ vm: "unread", slot: 0, chunkPages: 1048576 }, { deadlineMs: Infinity })[Symbol.asyncIterator]());
         await Promise.all(its.map((it) => it.next()));
         console.log("open");
         setInterval(() => {}, 1000);`,
      ],
      { cwd: new URL("../", import.meta.url).pathname, stdio: ["ignore", "pipe", "inherit"] },
    );
    await new Promise<void>((resolve) => client.stdout!.once("data", () => resolve()));
    await new Promise((r) => setTimeout(r, 3000));
    global.gc?.();
    const held = process.memoryUsage();
    const sent = await fetch(`http://127.0.0.1:${h.httpPort}/metrics`).then((r) => r.text());
    const messages = Number(/grpc_server_msg_sent_total\{[^}]*grpc_method="ReadMemory"\} (\d+)/.exec(sent)?.[1] ?? NaN);
    client.kill("SIGKILL");
    report(
      `server memory held by 40 unread ReadMemory streams (${gib} GiB guest, 8 MiB messages)`,
      `${fmt((held.external - before.external) / 2 ** 20, 0)} MiB`,
      `buffers; ${fmt(messages, 0)} of ${fmt(40 * perStream, 0)} messages produced; RSS ${fmt((held.rss - before.rss) / 2 ** 20, 0)} MiB`,
    );
  } finally {
    await h.close();
  }
}

/**
 * Issue 14's comparison: 12 cells (six arm64 mechanisms x no policy and
 * auto-converge) of an 8 GiB, 8-vCPU guest, on one hypervisor process and on
 * two: the wall time, the speed-up, and simulated seconds per wall second.
 */
async function compareBench() {
  console.log("\ncompare: 12 cells of an 8 GiB, 8-vCPU guest (6 arm64 mechanisms x none, auto-converge), hot-cold 100,000 writes/s per vCPU, 90% to 2% of memory, 10 Gbit/s");
  const mechanisms = ["bitmap", "bitmap+manual", "bitmap+initially-set", "ring", "bitmap+dbm", "bitmap+hdbss"].map(parseMechanism);
  const cells: Cell[] = [];
  for (const mechanism of mechanisms) {
    for (const autoConverge of [null, QEMU_AUTO_CONVERGE]) cells.push({ index: cells.length, arch: "arm64", mechanism, policy: autoConverge ? "auto-converge" : "none", config: { ...DEFAULT_CONFIG, mechanism: mechanism.name, autoConverge } });
  }
  const guest = {
    memoryBytes: 8 * 2 ** 30,
    vcpus: 8,
    backing: "4k" as const,
    workload: Workload.fromPartial({ pattern: WorkloadPattern.WORKLOAD_PATTERN_HOT_COLD, writesPerSecond: 100_000, hotFraction: 0.02, hotWriteFraction: 0.9 }),
    noisyWritesPerSecond: null,
    vcpuWorkloads: null,
    seed: 1,
    ringEntries: 4096,
  };
  // CPU seconds of this process and of its children once they have exited (the hypervisors runComparison starts): /proc/self/stat's utime, stime, cutime, cstime.
  const cpuSeconds = () => readFileSync("/proc/self/stat", "utf8").split(") ")[1].split(" ").slice(11, 15).reduce((n, x) => n + Number(x), 0) / 100;
  const walls: number[] = [];
  for (const jobs of [1, 2]) {
    const cpu0 = cpuSeconds();
    const r = await runComparison({ guest, cells, jobs });
    const cores = (cpuSeconds() - cpu0) / (r.wallTimeMs / 1e3);
    const failed = r.results.filter((x) => x.status !== "completed" || !x.verified).length;
    const simulated = r.results.reduce((n, x) => n + x.totalTimeMs, 0) / 1e3;
    walls.push(r.wallTimeMs);
    report(`--jobs ${jobs}: wall time of the 12 cells`, `${fmt(r.wallTimeMs / 1e3, 1)} s`, `${fmt(simulated / (r.wallTimeMs / 1e3), 1)} simulated s per wall s, ${fmt(cores, 2)} cores busy${failed ? `; ${failed} cells FAILED` : ""}`);
  }
  // One cell already keeps more than a core busy (the hypervisor and the controller's data path overlap), so 2 CPUs cap the speed-up below 2.
  report("  speed-up from 1 to 2 hypervisor processes", `${fmt(walls[0] / walls[1], 2)}x`, `target close to 2x on ${availableParallelism()} CPUs`);
}

console.log(`npm run bench on node ${process.version}, ${process.arch}; load average ${loadavg().map((l) => l.toFixed(2)).join(" ")} on ${availableParallelism()} CPUs (ratios are measured in the same run; absolute figures swing with the load)`);
if (want("hypervisor")) await hypervisorBench(Number(args.gib));
if (want("datapath")) await datapathBench(16);
if (want("ring")) await ringBench();
if (want("hardware")) await hardwareBench(Number(args.gib));
if (want("migration")) await migrationBench();
if (want("workers")) await workersBench();
if (want("limits")) await limitsBench(Number(args.gib));
if (want("scale")) await scaleBench(String(args["scale-gib"]).split(",").map(Number));
if (want("compare")) await compareBench();
console.log("\nsummary (JSON):");
console.log(JSON.stringify(rows));
