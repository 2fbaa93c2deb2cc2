import assert from "node:assert/strict";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { DEFAULT_COSTS } from "../../../services/hypervisor/model/cost-model.js";
import { EXIT } from "../cli.js";
import { DEFAULT_CONFIG } from "../migrate.js";
import { predict } from "../predict/model.js";
import { parseMechanism } from "../trackers/index.js";
import { cli, noStack } from "./cli-harness.js";
import { credentials, status } from "@grpc/grpc-js";
import { createLogger } from "../../../common/log.js";
import { MigrationControllerServiceClient, PredictMigrationRequest, type PredictMigrationResponse } from "../../../proto/gen/dirtytrack/controller/v1/controller.js";
import { rejects } from "../../../tests/grpc-assert.js";
import { QEMU_AUTO_CONVERGE } from "../policies/auto-converge.js";
import { MigrationService } from "../service.js";

const MiB = 2 ** 20;

interface Checked {
  converges: boolean;
  "dirty-sync-count": number;
  downtime: number | null;
  "total-time": number;
  check: { converged: boolean; "dirty-sync-count": number; downtime: number | null; "total-time": number };
}

describe("predict", () => {
  let dir: string;
  before(async () => (dir = await mkdtemp(join(tmpdir(), "predict-"))));
  after(() => rm(dir, { recursive: true, force: true }));

  async function checked(args: string[]): Promise<Checked> {
    const json = join(dir, "p.json");
    const r = await cli(["predict", "--check", "--json", json, ...args]);
    assert.equal(r.code, EXIT.ok, `${args.join(" ")}: ${r.out}${r.err}`);
    assert.match(r.out, /^predicted: /m);
    assert.match(r.out, /^simulated: /m);
    assert.match(r.out, /^error: converge matches/m);
    return JSON.parse(await readFile(json, "utf8"));
  }

  // The README's bounds for a converging migration: syncs within 1, downtime and total time within 15%.
  const within = (p: number, a: number, share: number, what: string) => assert.ok(Math.abs(p - a) <= share * a, `${what}: predicted ${p}, simulated ${a}`);

  test("--check on converging workloads: the rounds, total time and downtime are within the README's bounds", async () => {
    for (const args of [
      ["--memory", "512MiB", "--vcpus", "2", "--dirty-rate", "60", "--bandwidth", "2Gbit"],
      ["--memory", "512MiB", "--vcpus", "2", "--dirty-rate", "120", "--bandwidth", "2Gbit", "--mechanism", "ring"],
      ["--memory", "512MiB", "--vcpus", "2", "--working-set", "64MiB", "--dirty-rate", "400", "--bandwidth", "2Gbit", "--mechanism", "bitmap+manual"],
      ["--memory", "512MiB", "--vcpus", "2", "--dirty-rate", "200", "--bandwidth", "2Gbit", "--auto-converge"],
    ]) {
      const j = await checked(args);
      assert.equal(j.converges, true, args.join(" "));
      assert.ok(Math.abs(j["dirty-sync-count"] - j.check["dirty-sync-count"]) <= 1, `${args.join(" ")}: syncs ${j["dirty-sync-count"]} against ${j.check["dirty-sync-count"]}`);
      within(j.downtime!, j.check.downtime!, 0.15, `${args.join(" ")}: downtime`);
      within(j["total-time"], j.check["total-time"], 0.15, `${args.join(" ")}: total time`);
    }
  });

  test("--check on a workload that dirties faster than the link carries: both say it does not converge", async () => {
    const j = await checked(["--memory", "128MiB", "--vcpus", "2", "--dirty-rate", "200", "--bandwidth", "1Gbit", "--completion-timeout-per-gib", "40"]);
    assert.equal(j.converges, false);
    assert.equal(j.check.converged, false);
  });

  test("the model: faster dirtying, a slower link or a costlier mechanism never predicts a shorter migration", () => {
    const base = { memoryBytes: 2 ** 31, workingSetBytes: 2 ** 31, dirtyPagesPerSecond: 50_000, vcpus: 4, mechanism: parseMechanism("bitmap"), ringEntries: 4096, config: DEFAULT_CONFIG, costs: DEFAULT_COSTS };
    const t = (o: Partial<typeof base>) => predict({ ...base, ...o }).totalTimeMs;
    assert.ok(t({ dirtyPagesPerSecond: 100_000 }) > t({}));
    assert.ok(t({ config: { ...DEFAULT_CONFIG, bandwidthBitsPerSecond: 5e9 } }) > t({}));
    assert.ok(t({ costs: { ...DEFAULT_COSTS, writeFaultNs: 0 } }) > t({}), "a dearer fault slows the guest: fewer pages dirty, a shorter migration");
    const idle = predict({ ...base, dirtyPagesPerSecond: 0 });
    assert.equal(idle.dirtySyncCount, 2, "nothing dirty: round 0, then the switchover's sync");
  });

  test("the rate from estimate --json is the initial rate over the working set; bad input exits 2 with the reason", async () => {
    const est = join(dir, "est.json");
    await writeFile(est, JSON.stringify({ "dirty-rate": 100, "calc-time": 1000 }));
    const r = await cli(["predict", "--from-estimate", est, "--memory", "1GiB", "--working-set", "256MiB"]);
    assert.equal(r.code, EXIT.ok, r.err);
    // 100 MiB seen in 1 s of a 256 MiB set: an initial rate of -256 ln(1 - 100/256) = 126.8 MiB/s.
    assert.match(r.out, /dirty rate 126\.8 MiB\/s untracked \(from .*est\.json: 100 MiB\/s over 1000 ms\)/);
    const bad = join(dir, "bad.json");
    await writeFile(bad, JSON.stringify({ rate: 1 }));
    for (const [args, message] of [
      [[], /give the dirty rate: --dirty-rate MIBPS, --from-estimate FILE, or --source ADDR --vm NAME/],
      [["--dirty-rate", "5", "--from-estimate", est], /--dirty-rate and --from-estimate: give one source/],
      [["--dirty-rate=-5"], /--dirty-rate -5: must be MiB\/s/],
      [["--dirty-rate", "5", "--memory", "1GiB", "--working-set", "2GiB"], /--working-set 2GiB: must be between 4 KiB and --memory/],
      [["--from-estimate", bad], /not the JSON of estimate --json/],
      [["--from-estimate", join(dir, "none.json")], /--from-estimate .*none\.json: ENOENT/],
      [["--vm", "x", "--check"], /--check migrates a guest built from the numbers/],
      [["--dirty-rate", "5", "--mechanism", "bitmap+frob"], /unknown part 'frob'/],
    ] as [string[], RegExp][]) {
      const e = await cli(["predict", ...args]);
      assert.equal(e.code, EXIT.usage, `${args.join(" ")}: ${e.err}`);
      assert.match(e.err, message);
      noStack(e.err);
    }
  });
});

describe("PredictMigration over gRPC (serve's dirtytrack.controller.v1)", () => {
  let svc: MigrationService;
  let client: InstanceType<typeof MigrationControllerServiceClient>;
  before(async () => {
    svc = new MigrationService(
      { hypervisors: ["127.0.0.1:1", "127.0.0.1:2"], vm: "unused", memoryBytes: MiB, vcpus: 1, writesPerSecond: 0, hotFraction: 0.1, realtimeSpeed: 1, pauseMs: 0, policy: DEFAULT_CONFIG, costs: DEFAULT_COSTS },
      createLogger("migration-controller", "silent"),
    );
    const { grpcPort } = await svc.listen({ host: "127.0.0.1", grpcPort: 0, httpPort: 0 });
    client = new MigrationControllerServiceClient(`127.0.0.1:${grpcPort}`, credentials.createInsecure());
  });
  after(async () => {
    client.close();
    await svc.stop();
  });
  const call = (req: Partial<PredictMigrationRequest>) =>
    new Promise<PredictMigrationResponse>((resolve, reject) => client.predictMigration(PredictMigrationRequest.fromPartial(req), (err, res) => (err ? reject(err) : resolve(res!))));

  test("answers what the CLI's model predicts, and refuses bad numbers with INVALID_ARGUMENT", async () => {
    const r = await call({ memoryBytes: BigInt(2 ** 31), vcpus: 4, dirtyRateMibps: 400, mechanism: "bitmap-manual", autoConverge: true });
    const local = predict({ memoryBytes: 2 ** 31, workingSetBytes: 2 ** 31, dirtyPagesPerSecond: (400 * MiB) / 4096, vcpus: 4, mechanism: parseMechanism("bitmap+manual"), ringEntries: 4096, config: { ...DEFAULT_CONFIG, autoConverge: QEMU_AUTO_CONVERGE }, costs: DEFAULT_COSTS });
    assert.equal(r.converges, local.converges);
    assert.equal(r.dirtySyncCount, local.dirtySyncCount);
    assert.equal(r.totalTimeMs, local.totalTimeMs);
    assert.equal(r.downtimeMs, local.downtimeMs ?? undefined);
    assert.equal(r.rounds.length, r.roundsTotal);
    const never = await call({ memoryBytes: BigInt(2 ** 30), vcpus: 2, dirtyRateMibps: 5000 });
    assert.equal(never.converges, false);
    assert.equal(never.downtimeMs, undefined);
    assert.ok(never.rounds.length <= 1000 && never.roundsTotal >= never.rounds.length);
    for (const [req, message] of [
      [{ memoryBytes: 4095n, vcpus: 1 }, /memory_bytes 4095 must be a multiple of 4 KiB/],
      [{ memoryBytes: BigInt(2 ** 30), vcpus: 0 }, /vcpus 0 must be in \[1, 512\]/],
      [{ memoryBytes: BigInt(2 ** 30), vcpus: 1, workingSetBytes: BigInt(2 ** 31) }, /working_set_bytes .* must be between 4 KiB and memory_bytes/],
      [{ memoryBytes: BigInt(2 ** 30), vcpus: 1, dirtyRateMibps: -1 }, /dirty_rate_mibps -1 must be in \[0, 1e6\]/],
      [{ memoryBytes: BigInt(2 ** 30), vcpus: 1, mechanism: "bitmap+turbo" }, /mechanism 'bitmap\+turbo': unknown part 'turbo'/],
      [{ memoryBytes: BigInt(2 ** 30), vcpus: 1, dirtyLimit: true }, /dirty-limit works through the dirty ring/],
      [{ memoryBytes: BigInt(2 ** 30), vcpus: 1, bandwidthBitsPerSecond: 0 }, /bandwidth must be a positive number/],
      [{ memoryBytes: BigInt(2 ** 30), vcpus: 1, ringEntries: 1000 }, /ring_entries 1000 must be a power of two/],
    ] as [Partial<PredictMigrationRequest>, RegExp][]) {
      await rejects(call(req), status.INVALID_ARGUMENT, message);
    }
  });
});
