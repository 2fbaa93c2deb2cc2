/**
 * `npm run fidelity`: the model's prediction beside the measured or
 * published figure, and their ratio, for what calibration did not fit.
 *
 * - Held back: figures kvm-harness measured that the fit did not use. The
 *   model runs with the cost model fitted to the same measurements (so only
 *   the mechanism is tested): GET with sparser dirty pages than the fit's,
 *   logging on over a sparsely mapped slot, off over THP after a sparse
 *   pass, a ring reset of scattered entries, a logging pass through a dirty
 *   ring with and without ring-full exits.
 * - Published: seed 003's DBM scan (Keqian Zhu), Peter Xu's QEMU ring vs
 *   bitmap migration; run with the default costs.
 *
 * Measurements come from --measurements FILE (written by calibrate); without
 * it, from a fresh harness run when /dev/kvm is usable, else from the
 * measurements committed with the tests (a host of this machine kind).
 */
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import type { Io } from "../../common/io.js";
import { Arch, BackingPageSize, Capability, MemslotFlag, WorkloadPattern } from "../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { fitCostModel, hostFromHarness, type HarnessReport } from "../../services/hypervisor/model/calibration.js";
import { DEFAULT_COSTS, type CostModel } from "../../services/hypervisor/model/cost-model.js";
import { startHypervisor, type RunningHypervisor } from "../../tests/hypervisor-harness.js";
import { calibrate } from "./calibrate.js";
import { neverStoppingGuest } from "./race.js";

const COMMITTED = new URL("../../services/hypervisor/test/fixtures/kvm-harness-256mib.json", import.meta.url).pathname;
const ROOT = new URL("../../", import.meta.url).pathname;
const GiB = 2 ** 30;
const LOG = MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES;

export interface FidelityRow {
  group: "held back" | "published";
  quantity: string;
  unit: string;
  model: number;
  reference: number;
  /** model / reference */
  ratio: number;
  source: string;
  /** The band the issue asks for, as [low, high] ratios; absent where none is set. */
  target?: [number, number];
  met?: boolean;
  note?: string;
}

const HELP = `usage: npm run fidelity -- [options]

Prints the model's prediction beside the measured or published figure, and
their ratio, for every quantity calibration does not fit, and writes the same
as JSON.

options:
  --measurements FILE  a calibrate measurements file (default: measure now when
                       /dev/kvm is usable, else the committed measurements of a
                       host of this machine kind)
  --json FILE          write the rows as JSON (default fidelity.json)
  --skip-migrations    leave out the published migration comparison (two 24 GiB
                       migrations, about 20 s)
  -h, --help           this help`;

function row(r: Omit<FidelityRow, "ratio" | "met">): FidelityRow {
  const ratio = r.model / r.reference;
  return { ...r, ratio, ...(r.target ? { met: ratio >= r.target[0] && ratio <= r.target[1] } : {}) };
}

/** One x86_64 VM of `pages` pages mapped at 4 KiB (or 2 MiB) and paused, as the harness's slot after its first pass. */
async function mappedVm(h: RunningHypervisor, name: string, pages: number, costs: CostModel, opts: { backing2m?: boolean; ringEntries?: number } = {}) {
  const c = h.client;
  await c.createVm({
    vm: name,
    vcpus: 1,
    arch: Arch.ARCH_X86_64,
    // kvm_pvm's shadow MMU does not split eagerly (eager_page_split applies to the TDP MMU).
    eagerPageSplit: false,
    backingPageSize: opts.backing2m ? BackingPageSize.BACKING_PAGE_SIZE_2M : BackingPageSize.BACKING_PAGE_SIZE_4K,
    memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(pages * 4096) }],
    workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: 1e9 },
    ...(opts.ringEntries ? { dirtyRing: { capability: Capability.CAPABILITY_DIRTY_LOG_RING, bytes: BigInt(opts.ringEntries * 16), withBitmap: false } } : {}),
  });
  await c.advanceVm({ vm: name, durationNs: BigInt(Math.ceil(pages * (costs.translationFaultNs + costs.writeNs + 10) * 1.1)) });
  await c.pauseVm({ vm: name });
}

const slot = (pages: number, flags: number) => ({ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(pages * 4096), flags });

/** A guest pass writing each page once (GuestWrite), a full ring harvested and reset as the harness does; ns per page. */
async function ringPass(h: RunningHypervisor, name: string, pages: number): Promise<{ nsPerPage: number; fullExits: number }> {
  const c = h.client;
  let ns = 0;
  let fullExits = 0;
  let next = 0;
  while (next < pages) {
    const batch = Array.from({ length: Math.min(1024, pages - next) }, (_, i) => ({ vcpu: 0, gpa: BigInt(GiB + (next + i) * 4096), value: 1n }));
    const { results } = await c.guestWrite({ vm: name, writes: batch });
    for (const r of results) {
      ns += Number(r.costNs);
      if (!r.performed) break;
      next++;
    }
    if (results.some((r) => !r.performed)) {
      fullExits++;
      const got = await c.harvestDirtyRing({ vm: name, vcpu: 0, maxEntries: 1 << 20 });
      const reset = await c.resetDirtyRings({ vm: name });
      ns += Number(got.hostNs) + Number(reset.hostNs);
    }
  }
  return { nsPerPage: ns / pages, fullExits };
}

/** The figures calibration held back, predicted by the model fitted to the same measurements. */
export async function heldBack(report: HarnessReport, source: string): Promise<{ rows: FidelityRow[]; clamped: string[] }> {
  const host = hostFromHarness(report);
  const clamped: string[] = [];
  const costs: CostModel = { ...DEFAULT_COSTS, ...fitCostModel(host, (k) => clamped.push(k)) };
  const m = report.measurements;
  const pages = host.pages;
  const h = await startHypervisor({ costs });
  const rows: FidelityRow[] = [];
  const target: [number, number] = [0.75, 1.25];
  try {
    const c = h.client;
    const every = (n: number, value: bigint) => Array.from({ length: Math.ceil(pages / n) }, (_, i) => ({ vcpu: 0, gpa: BigInt(GiB + i * n * 4096), value }));
    const add = (key: string, quantity: string, unit: "us" | "ns/entry", model: number) => {
      if (m[key]) rows.push(row({ group: "held back", quantity, unit, model, reference: unit === "us" ? m[key].median / 1e3 : m[key].median, source, target }));
    };
    // GET with one dirty page in each 512 (the fit used one in each 64-page word): the per-call and per-page parts apart.
    await mappedVm(h, "sparse", pages, costs);
    await c.setUserMemoryRegion({ vm: "sparse", memslot: slot(pages, LOG) });
    await c.resumeVm({ vm: "sparse" });
    await c.guestWrite({ vm: "sparse", writes: every(512, 2n) });
    add("get_sparse8_ns", "GET_DIRTY_LOG, one dirty page in each 512", "us", Number((await c.getDirtyLog({ vm: "sparse", slot: 0 })).hostNs) / 1e3);
    // Logging on over a slot of which one page in 64 was ever mapped (the fit used one in 8): the walks and the entries apart.
    await c.createVm({ vm: "sparse64", vcpus: 1, arch: Arch.ARCH_X86_64, eagerPageSplit: false, memslots: [slot(pages, 0)] });
    await c.guestWrite({ vm: "sparse64", writes: every(64, 3n) });
    add("enable_logging_sparse64_ns", "enable logging, one page in 64 ever mapped", "us", Number((await c.setUserMemoryRegion({ vm: "sparse64", memslot: slot(pages, LOG) })).hostNs) / 1e3);
    // Logging off over THP after a logging pass over one page in 8: the zap of the split leaves, fewer of them.
    await mappedVm(h, "thp", pages, costs, { backing2m: true });
    await c.setUserMemoryRegion({ vm: "thp", memslot: slot(pages, LOG) });
    await c.resumeVm({ vm: "thp" });
    await c.guestWrite({ vm: "thp", writes: every(8, 4n) });
    await c.pauseVm({ vm: "thp" });
    add("disable_logging_thp_sparse_ns", "disable logging, THP backing, after a logging pass over one page in 8", "us", Number((await c.setUserMemoryRegion({ vm: "thp", memslot: slot(pages, 0) })).hostNs) / 1e3);
    // A ring reset of entries 65 pages apart: each entry its own mask, its own call (the fit's pass made one call per 64).
    await mappedVm(h, "scattered", pages, costs, { ringEntries: 1 << 16 });
    await c.setUserMemoryRegion({ vm: "scattered", memslot: slot(pages, LOG) });
    await c.resumeVm({ vm: "scattered" });
    await c.guestWrite({ vm: "scattered", writes: every(65, 5n) });
    const harvested = await c.harvestDirtyRing({ vm: "scattered", vcpu: 0, maxEntries: 1 << 16 });
    const reset = await c.resetDirtyRings({ vm: "scattered" });
    add("ring_reset_scattered_ns_per_entry", "KVM_RESET_DIRTY_RINGS, entries 65 pages apart", "ns/entry", Number(reset.hostNs) / harvested.count);
    // A logging pass through a ring: with the harness's small ring its full exits, reaped at once.
    for (const [key, entries, what] of [
      ["small_ring_pass_ns_per_page", report.small_ring_entries, `a logging pass through a ${report.small_ring_entries}-entry ring, ring-full exits reaped`],
      ["ring_pass_ns_per_page", 1 << 16, "a logging pass through a ring that holds it"],
    ] as const) {
      if (!m[key]) continue;
      const name = `ring-${entries}`;
      await mappedVm(h, name, pages, costs, { ringEntries: entries });
      await c.setUserMemoryRegion({ vm: name, memslot: slot(pages, LOG) });
      await c.resumeVm({ vm: name });
      const pass = await ringPass(h, name, pages);
      rows.push(row({ group: "held back", quantity: what, unit: "ns/page", model: pass.nsPerPage, reference: m[key].median, source, target, note: `${pass.fullExits} ring-full exits in the model` }));
    }
    // The never-stopping guest: the share of changed pages reported one collection later.
    if (report.race && report.race.changed_pages > 0 && m.race_check_ns) {
      const r = await neverStoppingGuest(c, { vm: "race", pages, intervalNs: 10e6, checkNs: m.race_check_ns.median, iterations: 31, writesPerSecond: 1e9, seed: 1n, vcpusRun: true, pattern: "sequential" });
      const reference = report.race.late_pages / report.race.changed_pages;
      const s = m.race_late_share;
      rows.push({
        ...row({ group: "held back", quantity: "never-stopping guest, GET every 10 ms: share of changed pages reported one collection later", unit: "share", model: r.lateShare, reference, source }),
        // "Within the range real KVM shows": its iterations' lowest and highest share.
        target: [s.min / reference, s.max / reference],
        met: r.lateShare >= s.min && r.lateShare <= s.max,
        note: `model ${r.late} of ${r.changed} pages, ${r.lost} lost; KVM ${report.race.late_pages} of ${report.race.changed_pages}, per iteration ${s.min.toFixed(4)}-${s.max.toFixed(4)}; the VMM reads the slot in ${(m.race_check_ns.median / 1e3).toFixed(0)} us`,
      });
    }
  } finally {
    await h.close();
  }
  return { rows, clamped };
}

/** Seed 003 (Keqian Zhu's RFC): scanning the stage-2 PTEs of 64 GB for DBM dirty state takes about 40 ms. */
async function seed003Scan(): Promise<FidelityRow> {
  const h = await startHypervisor();
  try {
    const c = h.client;
    const pages = GiB / 4096;
    await c.createVm({ vm: "dbm", vcpus: 1, arch: Arch.ARCH_ARM64, memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(GiB) }], workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: 1e9 } });
    await c.enableCap({ vm: "dbm", capability: Capability.CAPABILITY_ARM_HW_DIRTY_LOG, args: [1n] });
    await c.setUserMemoryRegion({ vm: "dbm", memslot: { slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(GiB), flags: LOG } });
    await c.advanceVm({ vm: "dbm", durationNs: BigInt(Math.ceil(pages * (DEFAULT_COSTS.translationFaultNs + 100) * 1.1)) });
    await c.pauseVm({ vm: "dbm" });
    await c.getDirtyLog({ vm: "dbm", slot: 0 }); // every page mapped with DBM now
    const g = await c.getDirtyLog({ vm: "dbm", slot: 0 });
    return row({ group: "published", quantity: "DBM scan of the stage-2 PTEs of 64 GB (a nothing-dirty GET of 1 GiB, x 64)", unit: "ms", model: (Number(g.hostNs) * 64) / 1e6, reference: 40, source: "seed 003, Keqian Zhu RFC 20200525112406.28224-1-zhukeqian1@huawei.com", note: "dbmScanPteNs was derived from this figure: a check of the scan's per-PTE accounting, not a prediction" });
  } finally {
    await h.close();
  }
}

/**
 * Shameer Kolothum's arm64 hardware DBM RFC v2 (20230825093528.1637-1-shameerali.kolothum.thodi@huawei.com),
 * dirty_log_perf_test: 96 vCPUs each writing its own 512 MB (THP), manual protect with INITIALLY_SET. Run at an
 * eighth of the memory per vCPU and scaled back: a vCPU's dirty memory time is per page it writes, GET and
 * CLEAR are per page of the slot.
 */
async function shameerDbm(): Promise<FidelityRow[]> {
  const SCALE = 8;
  const vcpus = 96;
  const perVcpu = 131072 / SCALE;
  const pages = vcpus * perVcpu;
  const published = { false: { dirty: 4.22, get: 0.00047, clear: 0.48 }, true: { dirty: 0.41, get: 3.25, clear: 0.98 } };
  const source = "Shameer Kolothum, arm64 HW DBM RFC v2, 20230825093528.1637-1-shameerali.kolothum.thodi@huawei.com";
  const rows: FidelityRow[] = [];
  for (const dbm of [false, true]) {
    const h = await startHypervisor();
    try {
      const c = h.client;
      const vm = dbm ? "dbm" : "wp";
      const memslot = (flags: number) => ({ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(pages * 4096), flags });
      await c.createVm({ vm, vcpus, arch: Arch.ARCH_ARM64, backingPageSize: BackingPageSize.BACKING_PAGE_SIZE_2M, memslots: [memslot(0)], workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: 1e9 } });
      await c.enableCap({ vm, capability: Capability.CAPABILITY_MANUAL_DIRTY_LOG_PROTECT2, args: [3n] });
      if (dbm) await c.enableCap({ vm, capability: Capability.CAPABILITY_ARM_HW_DIRTY_LOG, args: [1n] });
      await c.setUserMemoryRegion({ vm, memslot: memslot(LOG) });
      // Every vCPU writes its own share, once (the selftest's guest loop); GuestWrite stands in where the time is not measured.
      const writeAll = async () => {
        for (let first = 0; first < pages; first += 16384)
          await c.guestWrite({ vm, writes: Array.from({ length: Math.min(16384, pages - first) }, (_, i) => ({ vcpu: Math.floor((first + i) / perVcpu), gpa: BigInt(GiB + (first + i) * 4096), value: 1n })) });
      };
      const collect = async () => {
        await c.pauseVm({ vm });
        const get = await c.getDirtyLog({ vm, slot: 0 });
        const clear = await c.clearDirtyLog({ vm, slot: 0, firstPage: 0n, numPages: pages, bitmap: get.bitmap });
        return { getS: (Number(get.hostNs) * SCALE) / 1e9, clearS: (Number(clear.hostNs) * SCALE) / 1e9 };
      };
      await writeAll(); // the first pass maps the memory; the test measures the ones after
      await collect();
      await c.resumeVm({ vm });
      for (let i = 0; i < vcpus; i++)
        await c.setWorkload({ vm, vcpu: i, workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: 1e9, workingSetFirstPage: BigInt(i * perVcpu), workingSetPages: BigInt(perVcpu) } });
      // A window short enough that no vCPU finishes its share, long enough for mmu-lock.ts (a quantum behind) to settle.
      const window = 40_000_000;
      const before = (await c.getVm({ vm })).vm!;
      await c.advanceVm({ vm, durationNs: BigInt(window) });
      const after = (await c.getVm({ vm })).vm!;
      const written = after.vcpus.map((v, i) => Number(v.writes - before.vcpus[i].writes));
      if (Math.max(...written) >= perVcpu) throw new Error("a vCPU finished its share inside the measuring window");
      // The test waits for the slowest vCPU.
      const dirtyS = (Math.max(...written.map((w) => window / w)) * perVcpu * SCALE) / 1e9;
      await writeAll();
      const r = { dirtyS, ...(await collect()) };
      const p = published[`${dbm}`];
      const what = dbm ? "with DBM" : "write protection";
      const target: [number, number] = [0.75, 1.25];
      rows.push(row({ group: "published", quantity: `96 vCPU x 512 MB THP, ${what}: dirty memory time`, unit: "s", model: r.dirtyS, reference: p.dirty, source, target }));
      rows.push(row({ group: "published", quantity: `96 vCPU x 512 MB THP, ${what}: get dirty log`, unit: "s", model: r.getS, reference: p.get, source, target }));
      rows.push(row({ group: "published", quantity: `96 vCPU x 512 MB THP, ${what}: clear dirty log`, unit: "s", model: r.clearS, reference: p.clear, source, target }));
    } finally {
      await h.close();
    }
  }
  return rows;
}

/** Runs the demo with the given flags and returns its JSON report's total time in seconds. */
function demoTotalSeconds(flags: string[]): Promise<number> {
  const dir = mkdtempSync(join(tmpdir(), "fidelity-"));
  const json = join(dir, "report.json");
  return new Promise<number>((resolve, reject) => {
    const child = spawn(process.execPath, ["--import", "tsx", "clients/migration-controller/main.ts", "demo", ...flags, "--json", json], { cwd: ROOT, stdio: ["ignore", "ignore", "pipe"] });
    let err = "";
    child.stderr.setEncoding("utf8").on("data", (d: string) => (err += d));
    child.on("error", reject);
    child.on("close", (code) => {
      if (code !== 0) return reject(new Error(`demo ${flags.join(" ")} exited ${code}: ${err.trim().split("\n").slice(-2).join(" ")}`));
      resolve(Number(JSON.parse(readFileSync(json, "utf8"))["total-time"]) / 1000);
    });
  }).finally(() => rmSync(dir, { recursive: true, force: true }));
}

/**
 * Peter Xu's QEMU dirty-ring series (v7, 20210506160549.130416-1-peterx@redhat.com; the table is
 * in its cover letter since v1): "a 24G guest, 8 vcpus, using 10g NIC", "random dirty workload
 * (800MB/s dirty rate upon 20G memory)": 73 s with a 4096-entry ring, 55 s with the bitmap. The
 * setup here: 24 GiB, 8 vCPUs writing 25,600 pages/s each (800 MiB/s) at random over 20 GiB,
 * 10 Gbit/s, x86_64. QEMU's "dirty logging" there is manual protect (KVM_CLEAR_DIRTY_LOG, which QEMU
 * has used whenever KVM offers it since 4.1, also his work): each chunk is re-protected just before it
 * is sent, so a page written between the sync and its send is not dirty again; the ring re-protects at
 * every reset, so such a page is sent again the next round.
 */
async function peterXuRingVsBitmap(): Promise<FidelityRow> {
  const setup = ["--memory", "24GiB", "--vcpus", "8", "--arch", "x86_64", "--workload", "hot-cold", "--hot-fraction", String(20 / 24), "--hot-write-fraction", "1", "--write-rate", "25600", "--bandwidth", "10Gbit"];
  const bitmap = await demoTotalSeconds([...setup, "--mechanism", "bitmap-manual"]);
  const ring = await demoTotalSeconds([...setup, "--mechanism", "ring", "--ring-entries", "4096"]);
  return row({
    group: "published",
    quantity: "migration total time, ring (4096 entries) / QEMU's dirty logging (manual protect): 24 GiB, 8 vCPUs, 800 MiB/s over 20 GiB, 10g",
    unit: "ratio",
    model: ring / bitmap,
    reference: 73 / 55,
    source: "Peter Xu, QEMU dirty ring v7, 20210506160549.130416-1-peterx@redhat.com",
    target: [0.9, 1.1],
    note: `model: ring ${ring.toFixed(1)} s, bitmap with manual protect ${bitmap.toFixed(1)} s`,
  });
}

async function loadMeasurements(file: string | undefined, say: (s: string) => void): Promise<{ report: HarnessReport; source: string }> {
  if (file) return { report: JSON.parse(readFileSync(file, "utf8")) as HarnessReport, source: file };
  if (existsSync("/dev/kvm")) {
    say("measuring this host's KVM (256 MiB slot, 3 repetitions, about a minute; --measurements FILE uses a calibrate run instead)");
    try {
      const { report } = await calibrate({ slotMib: 256, reps: 3, cc: process.env.CC ?? "cc", progress: (l) => say(l) });
      return { report, source: "this host, measured now (kvm-harness, 256 MiB)" };
    } catch (e) {
      say(`could not measure (${(e as Error).message}); using the committed measurements`);
    }
  }
  return { report: JSON.parse(readFileSync(COMMITTED, "utf8")) as HarnessReport, source: "committed measurements of a host of this machine kind (kvm-harness, 256 MiB)" };
}

export function formatRows(rows: FidelityRow[]): string {
  const lines = [`${"quantity".padEnd(84)}${"model".padStart(12)}${"reference".padStart(12)}${"ratio".padStart(8)}  target`];
  for (const r of rows) {
    const t = r.target ? `${+r.target[0].toFixed(2)}-${+r.target[1].toFixed(2)} ${r.met ? "met" : "MISSED"}` : "-";
    lines.push(`${`${r.quantity} (${r.unit})`.slice(0, 83).padEnd(84)}${r.model.toPrecision(4).padStart(12)}${r.reference.toPrecision(4).padStart(12)}${r.ratio.toFixed(2).padStart(8)}  ${t}`);
    if (r.note) lines.push(`    ${r.note}`);
  }
  return lines.join("\n");
}

export async function runFidelity(argv: string[], io: Io): Promise<number> {
  let v;
  try {
    v = parseArgs({ args: argv, options: { measurements: { type: "string" }, json: { type: "string" }, "skip-migrations": { type: "boolean" }, help: { type: "boolean", short: "h" } }, strict: true }).values;
  } catch (e) {
    io.err.write(`${(e as Error).message}\nrun with --help for usage\n`);
    return 2;
  }
  if (v.help) {
    io.out.write(HELP + "\n");
    return 0;
  }
  const say = (s: string) => io.err.write(`fidelity: ${s}\n`);
  try {
    const { report, source } = await loadMeasurements(v.measurements, say);
    say("held-back figures: running the model fitted to the same measurements");
    const { rows, clamped } = await heldBack(report, source);
    say("published figures: seed 003's scan");
    rows.push(await seed003Scan());
    say("published figures: Shameer's DBM figures (96 vCPUs)");
    rows.push(...(await shameerDbm()));
    if (!v["skip-migrations"]) {
      say("published figures: Peter Xu's ring vs bitmap (two 24 GiB migrations)");
      rows.push(await peterXuRingVsBitmap());
    }
    io.out.write(formatRows(rows) + "\n");
    if (clamped.length) io.out.write(`\nthe fit set ${clamped.join(", ")} to 0: below these measurements' noise (a larger slot or more repetitions separate it)\n`);
    const json = v.json ?? "fidelity.json";
    writeFileSync(json, JSON.stringify({ measurements: source, clamped, rows }, null, 2) + "\n");
    io.out.write(`\nwrote ${json}\n`);
    return 0;
  } catch (e) {
    io.err.write(`fidelity: ${(e as Error).message}\n`);
    return 1;
  }
}
