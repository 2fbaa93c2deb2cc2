import assert from "node:assert/strict";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { spawnService } from "../../../common/spawn.js";
import { WorkloadPattern } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { connectHypervisor } from "../../../services/hypervisor/client.js";
import { GiB, MiB, startHypervisor, type RunningHypervisor } from "../../../tests/hypervisor-harness.js";
import { COMMANDS, EXIT } from "../cli.js";
import { cli, noStack } from "./cli-harness.js";

describe("migration controller CLI", () => {
  let h: RunningHypervisor;
  let dir: string;
  before(async () => {
    h = await startHypervisor();
    dir = await mkdtemp(join(tmpdir(), "mc-"));
    await h.client.createVm({
      vm: "web",
      vcpus: 2,
      memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(64 * MiB) }],
      workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_HOT_COLD, writesPerSecond: 50_000 },
    });
    await h.client.advanceVm({ vm: "web", durationNs: 100_000_000n });
  });
  after(() => h.close());

  test("estimate measures a running VM's dirty rate as QEMU's calc-dirty-rate, and refuses bad input precisely", async () => {
    await h.client.createVm({
      vm: "est",
      vcpus: 1,
      memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(256 * MiB) }],
      workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: 10_000 },
    });
    await h.client.advanceVm({ vm: "est", durationNs: 100_000_000n });
    const json = join(dir, "rate.json");
    const r = await cli(["estimate", "--source", h.address, "--vm", "est", "--mode", "dirty-bitmap", "--calc-time", "500ms", "--json", json]);
    assert.equal(r.code, 0, r.err);
    assert.match(r.out, /Dirty rate: 3\d \(MB\/s\), dirty-bitmap, calc time 500 ms/);
    assert.match(r.out, /guest writes\/s: [\d,]+ before, [\d,]+ during \([\d.]+% slower while measuring\)/);
    const j = JSON.parse(await readFile(json, "utf8"));
    assert.equal(j.status, "measured");
    assert.ok(Number.isInteger(j["dirty-rate"]) && j["dirty-rate"] >= 30 && j["dirty-rate"] <= 40, `${j["dirty-rate"]} MiB/s`);
    assert.deepEqual([j["calc-time"], j["calc-time-unit"], j["sample-pages"], j.mode], [500, "millisecond", 0, "dirty-bitmap"]);
    for (const [args, code, msg] of [
      [["--calc-time", "10ms"], 2, /--calc-time 10ms: must be a whole number of ms from 50ms to 60s/],
      [["--mode", "guess"], 2, /--mode guess: must be one of page-sampling, dirty-bitmap, dirty-ring/],
      [["--mode", "dirty-ring"], 3, /mode dirty-ring needs a VM created with dirty rings/],
    ] as const) {
      const bad = await cli(["estimate", "--source", h.address, "--vm", "est", ...args]);
      assert.equal(bad.code, code, bad.err);
      assert.match(bad.err, msg);
      noStack(bad.err);
    }
    const none = await cli(["estimate", "--source", h.address, "--vm", "nope"]);
    assert.equal(none.code, 3);
    assert.match(none.err, /nope/);
  });

  test("--help lists the commands; each command's --help lists every flag it takes, with its unit, default and variable", async () => {
    const top = await cli(["--help"]);
    assert.equal(top.code, 0);
    for (const c of ["demo", "migrate", "compare", "predict", "record", "serve", "estimate", "calibrate"]) assert.match(top.out, new RegExp(`^  ${c}\\b`, "m"), c);
    for (const spec of COMMANDS) {
      for (const args of [[spec.name, "--help"], ["help", spec.name]]) {
        const r = await cli(args);
        assert.equal(r.code, 0, args.join(" "));
        // Every flag the command reads is listed, and only those: a flag of another command is refused.
        for (const [, flags] of spec.groups) for (const f of flags) assert.match(r.out, new RegExp(`^  --${typeof f === "string" ? f : f[0]}\\b`, "m"), `${spec.name} --help lists --${f}`);
        assert.match(r.out, /exit codes: 0 /, `${spec.name} --help gives its exit codes`);
      }
    }
    // Wrapped to the terminal: compare with single spaces.
    const flat = async (cmd: string) => (await cli([cmd, "--help"])).out.replace(/\s+/g, " ");
    const demo = await flat("demo");
    for (const s of ["--latency <duration>", "a bare number is ms (default: 0.1ms)", "--memory <size>", "(default: 4GiB)", "(default: 10Gbit)", "--workload <name>", "bursty"]) assert.ok(demo.includes(s), s);
    const migrate = await flat("migrate");
    for (const s of ["(env: MIGRATION_SOURCE; default: 127.0.0.1:50051)", "(env: MIGRATION_DESTINATION", "(env: TLS_CA_FILE)", "(env: AUTH_TOKEN)"]) assert.ok(migrate.includes(s), s);
    assert.match(await flat("serve"), /env: MIGRATION_HTTP_PORT; default: 9480.*LOG_LEVEL/);
    const wrong = await cli(["demo", "--hypervisors", "a:1"]);
    assert.equal(wrong.code, EXIT.usage);
    assert.match(wrong.err, /unknown option '--hypervisors'/);
  });

  test("a negative number and a duration's units parse the same way in every spelling", async () => {
    for (const args of [
      ["--latency", "-1"],
      ["--latency=-1"],
    ]) {
      const r = await cli(["migrate", "--vm", "web", "--source", h.address, ...args]);
      assert.equal(r.code, EXIT.usage, args.join(" "));
      assert.match(r.err, /--latency -1: must be a duration >= 0ms \(300ms, 1\.5s; a bare number is ms\)/);
    }
    for (const [flag, value, re] of [
      ["--progress-timeout", "-5", /--progress-timeout -5: must be a duration > 0ms \(1\.5s, 500ms, 2m; a bare number is seconds\)/],
      ["--rpc-timeout", "2h", /--rpc-timeout 2h: must be a duration from 100ms to 1h/],
      ["--downtime-limit", "0", /--downtime-limit 0: must be a duration > 0ms/],
      ["--downtime-limit", "fast", /--downtime-limit fast: must be a duration/],
      ["--noisy-vcpu-rate", "-3", /unknown option '--noisy-vcpu-rate'/],
    ] as const) {
      const r = await cli(["migrate", "--vm", "web", "--source", h.address, flag, value]);
      assert.equal(r.code, EXIT.usage, `${flag} ${value}`);
      assert.match(r.err, re);
    }
    const neg = await cli(["demo", "--noisy-vcpu-rate", "-3"]);
    assert.equal(neg.code, EXIT.usage);
    assert.match(neg.err, /--noisy-vcpu-rate -3: must be writes per second in \[0, 1e9\]/);
    // The same downtime limit in ms, in seconds and bare: the same switchover threshold.
    const thresholds = [];
    for (const limit of ["250", "250ms", "0.25s"]) {
      const r = await cli(["migrate", "--source", h.address, "--vm", "web", "--dest-vm", `web-${thresholds.length}`, "--downtime-limit", limit, "--quiet"]);
      assert.equal(r.code, 0, r.err);
      thresholds.push(/threshold ([\d.]+ \w+)/.exec(r.out)?.[1]);
      await h.client.destroyVm({ vm: `web-${thresholds.length - 1}` });
      await h.client.resumeVm({ vm: "web" });
    }
    assert.equal(new Set(thresholds).size, 1, thresholds.join(", "));
  });

  test("migrate within one hypervisor writes JSON with QEMU's names and explicit units, and an HTML report", async () => {
    const json = join(dir, "r.json");
    const html = join(dir, "r.html");
    const r = await cli(["migrate", "--source", h.address, "--vm", "web", "--mechanism", "bitmap-manual", "--json", json, "--report", html, "--quiet"]);
    assert.equal(r.code, 0, r.err);
    assert.match(r.out, /completed, verified: sha256 [0-9a-f]{16}… on both sides/);
    assert.match(r.out, /switchover after sync \d+: .* <= threshold .* = bandwidth x downtime limit/);
    const j = JSON.parse(await readFile(json, "utf8"));
    assert.equal(j.status, "completed");
    for (const k of ["total-time", "setup-time", "downtime", "expected-downtime"]) assert.equal(typeof j[k], "number", k);
    for (const k of ["transferred", "remaining", "total", "duplicate", "normal", "normal-bytes", "dirty-pages-rate", "mbps", "dirty-sync-count", "page-size", "precopy-bytes", "downtime-bytes"]) {
      assert.equal(typeof j.ram[k], "number", `ram.${k}`);
      assert.ok(j.units[`ram.${k}`], `unit of ram.${k}`);
    }
    assert.equal(j.ram.total, 64 * MiB);
    assert.equal(j.ram["page-size"], 4096);
    assert.equal(j.ram.transferred, j.ram["precopy-bytes"] + j.ram["downtime-bytes"]);
    assert.equal(j.ram["dirty-sync-count"], j.rounds.length, "one sync per round after round 0, plus the final one");
    assert.equal(j.units["ram.dirty-pages-rate"], "pages/s");
    assert.equal(j.units.downtime.split(" ")[0], "ms");
    assert.equal(j.verification.match, true);
    assert.equal(j.mechanism, "bitmap+manual");
    for (const [k, v] of Object.entries(j.rounds[0])) if (typeof v === "number") assert.ok(j.units[`rounds[].${k}`], `unit of rounds[].${k}`);
    for (const k of ["total-time", "downtime", "ram.transferred", "ram.dirty-pages-rate"]) assert.ok(Number.isInteger(k.split(".").reduce((o, x) => o[x], j)), `${k}: an integer, as query-migrate's`);
    const page = await readFile(html, "utf8");
    assert.match(page, /<svg[^>]*aria-label="Dirty rate at each sync \(MiB\/s\)"/);
    assert.match(page, /<svg[^>]*aria-label="Remaining \(dirty\) at each sync \(MiB\)"/);
    assert.doesNotMatch(page, /<script|<link|src="http/, "self-contained");
  });

  test("bad usage exits 2 with a message", async () => {
    for (const [args, re] of [
      [["migrate", "--vm", "web", "--bandwidth", "0"], /bandwidth '0' must be greater than zero/],
      [["migrate", "--vm", "web", "--bandwidth", "fast"], /'fast' is not a bandwidth/],
      [["migrate"], /--vm NAME is required/],
      [["migrate", "--vm", "web", "--mechanism", "magic"], /--mechanism 'magic' must start with the log, bitmap or ring/],
      [["migrate", "--vm", "web", "--mechanism", "ring+dbm"], /'ring\+dbm': the arm64 assists sync into bitmaps only/],
      [["migrate", "--vm", "web", "--mechanism", "ring+manual"], /rings are re-protected by RESET_DIRTY_RINGS/],
      [["migrate", "--vm", "web", "--mechanism", "bitmap+dbm+device"], /names two hardware assists \(dbm, device\)/],
      [["migrate", "--vm", "web", "--mechanism", "bitmap+manual+initially-set"], /names two protections/],
      [["demo", "--mechanism", "bitmap+pml", "--arch", "arm64"], /--mechanism bitmap\+pml needs --arch x86_64/],
      [["demo", "--arch", "riscv"], /--arch riscv: must be arm64 or x86_64/],
      [["migrate", "--vm", "web", "--mechanism", "bitmap+turbo"], /unknown part 'turbo'/],
      [["migrate", "--vm", "web", "--downtime-limit=-1"], /--downtime-limit -1/],
      [["teleport"], /unknown command 'teleport' \(use demo, migrate, compare, predict, record, serve, estimate or calibrate\)/],
      [["serve", "--hypervisor-a", "127.0.0.1:1"], /serve needs --hypervisor-a and --hypervisor-b/],
      [["demo", "--memory", "12KiB"], /--memory 12KiB: must be a multiple of 4 KiB and at least 1 MiB/],
      [["demo", "--ring-entries", "1000"], /--ring-entries 1000: must be a power of two/],
      [["demo", "--workload", "crypto"], /--workload crypto: must be one of hot-cold, uniform, sequential, zipf, bursty, training, trace, idle/],
      [["demo", "--checkpoint-every", "2s"], /--checkpoint-every is for --workload bursty/],
      [["demo", "--workload", "bursty", "--stream-for", "2s"], /--stream-for is for --workload training/],
      [["demo", "--workload", "bursty", "--checkpoint-every", "1s", "--checkpoint-for", "2s"], /--checkpoint-for must be shorter than --checkpoint-every/],
      [["demo", "--workload", "bursty", "--checkpoint-every", "soon"], /--checkpoint-every soon: must be a duration from 1ms to 1h/],
      [["demo", "--workload", "training", "--stream-rate", "0"], /--stream-rate 0: must be writes per second in \(0, 1e9\]/],
      [["demo", "--workload", "training", "--write-rate", "0"], /--write-rate 0: --workload training writes in every phase/],
      [["demo", "--backing", "3m"], /--backing 3m: must be one of 4k, 2m, 1g/],
      [["--frobnicate"], /unknown option '--frobnicate'/],
      [["migrate", "--vm", "web", "--cpu-throttle-initial", "30"], /--cpu-throttle-initial needs --auto-converge/],
      [["migrate", "--vm", "web", "--auto-converge", "--max-cpu-throttle", "100"], /--max-cpu-throttle 100: must be a whole percentage in \[1, 99\]/],
      [["migrate", "--vm", "web", "--auto-converge", "--throttle-trigger-threshold", "0"], /--throttle-trigger-threshold 0/],
    ] as [string[], RegExp][]) {
      const r = await cli(args);
      assert.equal(r.code, EXIT.usage, `${args.join(" ")}: ${r.err}`);
      assert.match(r.err, re);
      noStack(r.err);
    }
  });

  test("--mechanism composes the log, the protection and the assist; the first milestone's names are aliases of their compositions", async () => {
    for (const [given, canonical] of [
      ["bitmap-manual", "bitmap+manual"],
      ["bitmap+initially-set+dbm", "bitmap+initially-set+dbm"],
      ["bitmap+dbm+initially-set", "bitmap+initially-set+dbm"],
      ["dbm", "bitmap+dbm"],
      ["bitmap+get+none", "bitmap"],
    ]) {
      const json = join(dir, `mech-${given}.json`);
      await h.client.createVm({ vm: `m-${given.replaceAll("+", "-")}`, vcpus: 1, memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(8 * MiB) }] });
      const r = await cli(["migrate", "--source", h.address, "--vm", `m-${given.replaceAll("+", "-")}`, "--mechanism", given, "--json", json, "--quiet"]);
      assert.equal(r.code, 0, r.err);
      assert.equal(JSON.parse(await readFile(json, "utf8")).mechanism, canonical);
    }
  });

  test("unreachable hypervisor, unknown VM and an existing destination exit 3 with a clear message", async () => {
    const unreachable = await cli(["migrate", "--source", "127.0.0.1:1", "--vm", "web", "--quiet"]);
    assert.equal(unreachable.code, 3);
    assert.match(unreachable.err, /cannot reach the source hypervisor at 127\.0\.0\.1:1/);
    noStack(unreachable.err);
    const unknown = await cli(["migrate", "--source", h.address, "--vm", "nope", "--quiet"]);
    assert.equal(unknown.code, 3);
    assert.match(unknown.err, /no VM named 'nope'/);
    await h.client.resumeVm({ vm: "web" }); // the earlier migration left it paused, as QEMU leaves a migrated source
    const exists = await cli(["migrate", "--source", h.address, "--vm", "web", "--dest-vm", "web", "--quiet"]);
    assert.equal(exists.code, 3);
    assert.match(exists.err, /already exists/);
  });

  test("a destination hypervisor that dies mid-migration: clear failure, exit 3, the source resumed and not logging", async () => {
    const dst = await spawnService("services/hypervisor/main.ts", { HYPERVISOR_GRPC_PORT: "0", HYPERVISOR_HTTP_PORT: "0", HYPERVISOR_ANNOUNCE: "1" });
    await h.client.createVm({
      vm: "victim",
      vcpus: 2,
      memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(256 * MiB) }],
      workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: 1e8 },
    });
    await h.client.advanceVm({ vm: "victim", durationNs: 400_000_000n });
    await h.client.setWorkload({ vm: "victim", workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, writesPerSecond: 100_000 } });
    // Small chunks at a slow link: the kill lands while pages are being copied.
    const run = cli(["migrate", "--source", h.address, "--destination", dst.address, "--vm", "victim", "--bandwidth", "1Gbit", "--chunk-pages", "1024", "--quiet"]);
    const dstClient = connectHypervisor(dst.address);
    for (;;) {
      const vms = await dstClient.listVms({}).catch(() => ({ vms: [] }));
      if (vms.vms.length > 0) break;
      await new Promise((r) => setTimeout(r, 5));
    }
    dstClient.close();
    dst.proc.kill("SIGKILL");
    const r = await run;
    assert.equal(r.code, 3, r.err);
    assert.match(r.err, /cannot reach the destination hypervisor/);
    noStack(r.err + r.out);
    const s = (await h.client.getVm({ vm: "victim" })).vm!;
    assert.ok(s.vcpus.every((v) => !v.paused) && s.memslots.every((m) => !m.logging));
  });
});

test("the demo's one noisy vCPU shows in the per-vCPU dirty rates of a ring migration", async () => {
  const dir = await mkdtemp(join(tmpdir(), "noisy-"));
  const json = join(dir, "noisy.json");
  const r = await cli(["demo", "--memory", "256MiB", "--vcpus", "3", "--mechanism", "ring", "--workload", "uniform", "--write-rate", "2000", "--noisy-vcpu-rate", "20000", "--bandwidth", "1Gbit", "--quiet", "--json", json]);
  assert.equal(r.code, 0, r.err);
  const rates = JSON.parse(await readFile(json, "utf8")).rounds.find((x: { "vcpu-dirty-rate": unknown }) => x["vcpu-dirty-rate"])["vcpu-dirty-rate"].map((x: { "dirty-rate": number }) => x["dirty-rate"]);
  assert.ok(rates[0] > 5 * rates[1] && rates[0] > 5 * rates[2], `per-vCPU pages/s ${rates}`);
  await rm(dir, { recursive: true, force: true });
});

test("the embedded demo runs a verified migration between two hypervisor processes, its guest having touched every page first", async () => {
  const dir = await mkdtemp(join(tmpdir(), "demo-"));
  const json = join(dir, "demo.json");
  // Four vCPUs faulting at once contend for mmu_lock: the first touch takes longer than one fault per page.
  const r = await cli(["demo", "--memory", "256MiB", "--vcpus", "4", "--quiet", "--json", json]);
  assert.equal(r.code, 0, r.err);
  assert.match(r.out, /migration demo@127\.0\.0\.1:\d+ -> demo@127\.0\.0\.1:\d+ \(bitmap, stepped clock\): completed, verified/);
  assert.match(r.out, /downtime [\d.]+ ms \(limit 300 ms\)/);
  const report = JSON.parse(await readFile(json, "utf8"));
  assert.equal(report.ram.duplicate, 0, "no zero page: the guest wrote every page before the migration");
  await rm(dir, { recursive: true, force: true });
});

test("the phased workloads migrate and verify: a training job's streaming phase dirties all memory, then its hot loop converges; a database's checkpoint shows as a burst", async () => {
  const dir = await mkdtemp(join(tmpdir(), "phased-"));
  const rounds = async (args: string[]) => {
    const json = join(dir, "r.json");
    const r = await cli(["demo", "--memory", "128MiB", "--vcpus", "2", "--quiet", "--bandwidth", "1Gbit", "--json", json, ...args]);
    assert.equal(r.code, 0, r.err);
    assert.match(r.out, /completed, verified/);
    return JSON.parse(await readFile(json, "utf8")).rounds as { "dirty-pages": number; "guest-writes-rate": number }[];
  };
  const training = await rounds(["--workload", "training", "--stream-for", "1.5s", "--write-rate", "20000", "--stream-rate", "100000"]);
  assert.equal(training[1]["dirty-pages"], 32768, "the stream wrote every page during round 0");
  assert.ok(training.at(-1)!["dirty-pages"] < 32768 / 4, "the hot loop dirties a fraction");
  const bursty = await rounds(["--workload", "bursty", "--checkpoint-every", "1.2s", "--checkpoint-for", "0.2s", "--write-rate", "2000", "--checkpoint-rate", "100000"]);
  const rates = bursty.filter((x) => x["guest-writes-rate"] > 0).map((x) => x["guest-writes-rate"]);
  assert.ok(Math.max(...rates) > 3 * 2 * 2000, `a round through a checkpoint writes faster than the base rate: ${rates.map(Math.round)}`);
  await rm(dir, { recursive: true, force: true });
});
