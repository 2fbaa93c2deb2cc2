/**
 * `serve` runs the policies too: its real-time migrations, back and forth,
 * complete with auto-converge, post-copy and dirty-limit, and its metrics say so.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { createLogger } from "../../../common/log.js";
import { hypervisorPair, MiB } from "../../../tests/hypervisor-harness.js";
import { DEFAULT_CONFIG } from "../migrate.js";
import { DEFAULT_COSTS } from "../../../services/hypervisor/model/cost-model.js";
import { QEMU_AUTO_CONVERGE } from "../policies/auto-converge.js";
import { QEMU_DIRTY_LIMIT } from "../policies/dirty-limit.js";
import { MigrationService } from "../service.js";
import type { MigrationConfig } from "../types.js";

describe("serve with a policy", () => {
  const pair = hypervisorPair({ realtimeTickMs: 20 });
  before(() => pair.start());
  after(() => pair.stop());

  async function serveUntilMigrated(vm: string, policy: Omit<MigrationConfig, "sourceVm" | "destinationVm">): Promise<string> {
    const svc = new MigrationService(
      { hypervisors: [pair.src.address, pair.dst.address], vm, memoryBytes: 32 * MiB, vcpus: 2, writesPerSecond: 100_000, hotFraction: 0.5, realtimeSpeed: 1, pauseMs: 50, policy, costs: DEFAULT_COSTS },
      createLogger("migration-controller", "silent"),
    );
    const port = (await svc.listen({ host: "127.0.0.1", grpcPort: 0, httpPort: 0 })).httpPort;
    svc.start();
    const metrics = () => fetch(`http://127.0.0.1:${port}/metrics`).then((r) => r.text());
    try {
      for (let i = 0; i < 300; i++) {
        const text = await metrics();
        if (/^migration_migrations_total\{result="completed"[^}]*\} [1-9]/m.test(text)) return text;
        if (/^migration_migrations_total\{result="(?!completed)[^"]*"[^}]*\} [1-9]/m.test(text)) assert.fail(`a migration failed:\n${text.split("\n").filter((l) => l.startsWith("migration_migrations_total")).join("\n")}`);
        await new Promise((r) => setTimeout(r, 100));
      }
      assert.fail("no migration completed in 30 s");
    } finally {
      await svc.stop();
    }
  }

  test("post-copy: completed, with page requests counted", async () => {
    const text = await serveUntilMigrated("serve-pc", { ...DEFAULT_CONFIG, bandwidthBitsPerSecond: 1e9, downtimeLimitMs: 1, postcopy: { afterRounds: 1, preempt: true } });
    assert.match(text, /^migration_postcopy_requests_total\{vm="serve-pc"\} \d+/m);
    assert.match(text, /^migration_postcopy_blocktime_seconds_total\{vm="serve-pc"\} [\d.e-]+/m);
  });

  test("auto-converge: completed, its throttle exported", async () => {
    const text = await serveUntilMigrated("serve-ac", { ...DEFAULT_CONFIG, bandwidthBitsPerSecond: 1e9, autoConverge: QEMU_AUTO_CONVERGE });
    assert.match(text, /^migration_cpu_throttle_percentage\{vm="serve-ac"\} \d+/m);
  });

  test("dirty-limit over the dirty ring: completed", async () => {
    await serveUntilMigrated("serve-dl", { ...DEFAULT_CONFIG, mechanism: "ring", bandwidthBitsPerSecond: 1e9, dirtyLimit: { ...QEMU_DIRTY_LIMIT, vcpuDirtyLimitMBps: 20 } });
  });
});
