/**
 * A migration never leaves the source paused or logging, and never hangs:
 * the controller CLI as a real process, interrupted by real signals; a
 * destination hypervisor stopped with SIGSTOP; timeouts that fire when they
 * are due; the vCPUs' workload going with the VM; errors caught before a
 * migration starts.
 */
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { createInterface } from "node:readline";
import { status } from "@grpc/grpc-js";
import { after, before, describe, test } from "node:test";
import { spawnService, type SpawnedService } from "../../../common/spawn.js";
import { ClockDrive, WorkloadPattern } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { connectHypervisor, type HypervisorClient } from "../../../services/hypervisor/client.js";
import { GiB, MiB, startHypervisor } from "../../../tests/hypervisor-harness.js";
import { rejects } from "../../../tests/grpc-assert.js";
import { migrate, MigrationError } from "../migrate.js";

const ROOT = new URL("../../../", import.meta.url).pathname;
const ENV = { HYPERVISOR_GRPC_PORT: "0", HYPERVISOR_HTTP_PORT: "0", HYPERVISOR_ANNOUNCE: "1" };

/** The CLI as a process: its stderr lines as they come, and its exit. */
function controller(args: string[]) {
  const proc: ChildProcess = spawn(process.execPath, ["--import", "tsx", "clients/migration-controller/main.ts", ...args], {
    cwd: ROOT,
    env: { ...process.env, LOG_LEVEL: "warn" },
    stdio: ["ignore", "pipe", "pipe"],
  });
  const lines: string[] = [];
  const waiters: { re: RegExp; resolve: () => void }[] = [];
  createInterface({ input: proc.stderr! }).on("line", (l) => {
    lines.push(l);
    for (const w of waiters.filter((x) => x.re.test(l))) w.resolve();
  });
  let out = "";
  proc.stdout!.on("data", (b) => (out += b));
  const exit = new Promise<{ code: number | null; at: number }>((resolve) => proc.once("exit", (code) => resolve({ code, at: performance.now() })));
  return {
    proc,
    lines,
    exit,
    get out() {
      return out;
    },
    /** Resolves when a stderr line matches (or the process ended without one). */
    waitFor: (re: RegExp) =>
      new Promise<void>((resolve, reject) => {
        if (lines.some((l) => re.test(l))) return resolve();
        waiters.push({ re, resolve });
        void exit.then(() => reject(new Error(`exited before a line matched ${re}:\n${lines.join("\n")}\n${out}`)));
      }),
  };
}

/** A real-time VM of 16 MiB whose guest dirties all of it in about a second: round 0 and the stop-and-copy take wall time. */
async function realtimeVm(c: HypervisorClient, vm: string) {
  await c.createVm({
    vm,
    vcpus: 1,
    clock: ClockDrive.CLOCK_DRIVE_REALTIME,
    memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(16 * MiB) }],
    workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, writesPerSecond: 20_000 },
  });
}

/** 100 Mbit/s: 16 MiB take 1.4 s; a 3 s downtime limit lets the whole VM go in the stop-and-copy. */
const SLOW = ["--bandwidth", "100Mbit", "--downtime-limit", "3000"];

async function assertLeftAlone(c: HypervisorClient, src: string, dest: HypervisorClient, dst: string) {
  const v = (await c.getVm({ vm: src })).vm!;
  assert.ok(v.vcpus.every((x) => !x.paused), "the source runs");
  assert.ok(v.memslots.every((m) => !m.logging), "the source does not log");
  await rejects(dest.getVm({ vm: dst }), status.NOT_FOUND, /no VM named/);
}

describe("a migration interrupted or stuck leaves the source running", () => {
  let a: SpawnedService;
  let b: SpawnedService;
  let src: HypervisorClient;
  let dst: HypervisorClient;
  before(async () => {
    [a, b] = await Promise.all([spawnService("services/hypervisor/main.ts", ENV), spawnService("services/hypervisor/main.ts", ENV)]);
    src = connectHypervisor(a.address);
    dst = connectHypervisor(b.address);
  });
  after(async () => {
    src.close();
    dst.close();
    b.proc.kill("SIGCONT");
    await Promise.all([a.stop(), b.stop()]);
  });

  test("SIGINT during the stop-and-copy: the source is resumed, logging is off, the destination removed, exit 130", async () => {
    await realtimeVm(src, "int");
    const cli = controller(["migrate", "--source", a.address, "--destination", b.address, "--vm", "int", ...SLOW]);
    await cli.waitFor(/switchover: pausing the source/);
    cli.proc.kill("SIGINT");
    const { code } = await cli.exit;
    assert.equal(code, 130, cli.lines.join("\n"));
    assert.match(cli.lines.at(-1)!, /^migration interrupted by SIGINT: the source VM 'int' is running and no longer logging; the destination VM was removed$/);
    await assertLeftAlone(src, "int", dst, "int-migrated");
    // The next migration is not refused, and the destination then runs the guest's workload.
    const r = await migrate({ sourceVm: "int", destinationVm: "int", bandwidthBitsPerSecond: 1e9 }, { source: src, destination: dst });
    assert.equal(r.verification?.match, true);
    const w0 = (await dst.getVm({ vm: "int" })).vm!.vcpus[0];
    await new Promise((res) => setTimeout(res, 300));
    const w1 = (await dst.getVm({ vm: "int" })).vm!.vcpus[0];
    assert.equal(w1.workload?.pattern, WorkloadPattern.WORKLOAD_PATTERN_UNIFORM);
    assert.ok(w1.writes > w0.writes, "the migrated guest keeps writing on the destination");
  });

  test("SIGTERM while round 0 sends: the same cleanup, exit 143", async () => {
    await realtimeVm(src, "term");
    const cli = controller(["migrate", "--source", a.address, "--destination", b.address, "--vm", "term", ...SLOW]);
    await cli.waitFor(/round 0: sending/);
    await new Promise((res) => setTimeout(res, 300));
    cli.proc.kill("SIGTERM");
    assert.equal((await cli.exit).code, 143, cli.lines.join("\n"));
    assert.match(cli.lines.at(-1)!, /^migration interrupted by SIGTERM: the source VM 'term' is running and no longer logging; the destination VM was removed$/);
    await assertLeftAlone(src, "term", dst, "term-migrated");
  });

  test("a destination that hangs (SIGSTOP) in the stop-and-copy is detected within the RPC timeout; the source runs again", async () => {
    await realtimeVm(src, "hang");
    const cli = controller(["migrate", "--source", a.address, "--destination", b.address, "--vm", "hang", "--rpc-timeout", "2", ...SLOW]);
    await cli.waitFor(/switchover: pausing the source/);
    b.proc.kill("SIGSTOP");
    const stoppedAt = performance.now();
    try {
      const { code, at } = await cli.exit;
      assert.equal(code, 3, cli.lines.join("\n"));
      assert.ok(at - stoppedAt < 15_000, `the controller gave up ${((at - stoppedAt) / 1e3).toFixed(1)} s after the hang`);
      const all = cli.lines.join("\n");
      assert.match(all, /migration failed: cannot reach the destination hypervisor/);
      // It says what it saw: the source is back, and it could not tell about the frozen destination.
      assert.match(all, /the source VM 'hang' is running and no longer logging; the destination VM could not be checked/);
      const v = (await src.getVm({ vm: "hang" })).vm!;
      assert.ok(v.vcpus.every((x) => !x.paused) && v.memslots.every((m) => !m.logging));
    } finally {
      b.proc.kill("SIGCONT");
    }
  });

  test("the completion timeout fires when it is due in the real-time drive, not at the next sync", async () => {
    await src.createVm({ vm: "slow", vcpus: 1, clock: ClockDrive.CLOCK_DRIVE_REALTIME, memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(MiB) }] });
    // 1 MiB at 1 kbit/s would take over two hours; 1536 s per GiB is 1.5 s for 1 MiB.
    const t0 = performance.now();
    await assert.rejects(
      migrate({ sourceVm: "slow", destinationVm: "slow", bandwidthBitsPerSecond: 1000, completionTimeoutPerGiBS: 1536 }, { source: src, destination: dst }),
      (e: MigrationError) => e.kind === "not-converged" && /completion timeout of 1536 s per GiB \(1\.5 s/.test(e.message),
    );
    const wall = performance.now() - t0;
    assert.ok(wall >= 1400 && wall < 5000, `failed after ${wall.toFixed(0)} ms`);
    await assertLeftAlone(src, "slow", dst, "slow");
  });
});

describe("timeouts, vCPU state and early errors (stepped drive, in process)", () => {
  test("--bandwidth 1Kbit --memory 1MiB fails on the completion timeout at once, with exit 4", async () => {
    const cli = controller(["demo", "--memory", "1MiB", "--bandwidth", "1Kbit", "--quiet"]);
    const { code } = await cli.exit;
    assert.equal(code, 4, cli.lines.join("\n"));
    assert.match(cli.lines.join("\n"), /did not converge: 0\.1 s reached the completion timeout of 150 s per GiB \(0\.1 s for 0\.00 GiB\)/);
  });

  test("the vCPUs' workload, generator position and write sequence move with the VM", async () => {
    const h = await startHypervisor();
    try {
      const c = h.client;
      await c.createVm({
        vm: "w",
        vcpus: 3,
        memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(32 * MiB) }],
        workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_HOT_COLD, writesPerSecond: 200_000, hotFraction: 0.1, seed: 42n },
      });
      await c.advanceVm({ vm: "w", durationNs: 50_000_000n });
      const r = await migrate({ sourceVm: "w", destinationVm: "w2" }, { source: c, destination: c });
      assert.equal(r.verification?.match, true);
      const [s, d] = await Promise.all([c.getVcpuState({ vm: "w" }), c.getVcpuState({ vm: "w2" })]);
      assert.deepEqual(d, s);
      assert.ok(s.writeSequence > 0n && s.vcpus.every((v) => v.generator.length > 25), "a real position, not a fresh generator");
      const after = await c.advanceVm({ vm: "w2", durationNs: 10_000_000n });
      assert.ok(after.writes > 0n, "the destination's guest runs its workload");
    } finally {
      await h.close();
    }
  });

  test("SetVcpuState refuses running vCPUs, a different vCPU count and a malformed generator", async () => {
    const h = await startHypervisor();
    try {
      const c = h.client;
      await c.createVm({ vm: "s", vcpus: 2, memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(MiB) }] });
      const st = await c.getVcpuState({ vm: "s" });
      await rejects(c.setVcpuState({ vm: "s", vcpus: st.vcpus, writeSequence: 0n }), status.FAILED_PRECONDITION, /must be paused.*EBUSY/);
      await c.pauseVm({ vm: "s" });
      await rejects(c.setVcpuState({ vm: "s", vcpus: st.vcpus.slice(1) }), status.INVALID_ARGUMENT, /1 vCPU states for a VM with 2 vCPUs/);
      const bad = st.vcpus.map((v) => ({ ...v, generator: Buffer.from([9, 0, 0]) }));
      await rejects(c.setVcpuState({ vm: "s", vcpus: bad }), status.INVALID_ARGUMENT, /generator state of 3 bytes is malformed/);
      await c.setVcpuState({ vm: "s", vcpus: st.vcpus, writeSequence: 5n });
      assert.equal((await c.getVcpuState({ vm: "s" })).writeSequence, 5n);
    } finally {
      await h.close();
    }
  });

  test("an unwritable --json fails before the migration starts (exit 2); demo --memory 100TiB explains the budget (exit 3)", async () => {
    const h = await startHypervisor();
    try {
      await h.client.createVm({ vm: "j", vcpus: 1, memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(MiB) }] });
      const cli = controller(["migrate", "--source", h.address, "--vm", "j", "--json", "/nonexistent/x.json"]);
      assert.equal((await cli.exit).code, 2);
      assert.match(cli.lines.join("\n"), /--json \/nonexistent\/x\.json: the directory \/nonexistent does not exist/);
      assert.deepEqual((await h.client.listVms({})).vms.map((v) => v.vm), ["j"], "nothing was created");
    } finally {
      await h.close();
    }
    const demo = controller(["demo", "--memory", "100TiB", "--quiet"]);
    assert.equal((await demo.exit).code, 3, demo.lines.join("\n"));
    const text = demo.lines.join("\n");
    assert.match(text, /VM 'demo' \(100 TiB of guest memory, 4 vCPUs\) needs .* of hypervisor memory, but .* budget is left \(HYPERVISOR_MEMORY_BUDGET/);
    assert.doesNotMatch(text, /RESOURCE_EXHAUSTED|\n\s+at /);
  });
});
