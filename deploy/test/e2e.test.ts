/**
 * The stack as docker compose would run it, as processes on 127.0.0.1: two
 * hypervisors, a page-tracking device registered with each, the migration
 * controller's service migrating a VM back and forth (device mechanism), and
 * a real Prometheus with the project's own configuration and rules. Then
 * every dashboard query must parse and return data, every rule must load and
 * evaluate, and every component's /metrics must pass promtool.
 */
import assert from "node:assert/strict";
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { cpSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { spawnService, type SpawnedService } from "../../common/spawn.js";
import { connectHypervisor } from "../../services/hypervisor/client.js";
import { missingCommands, needTools } from "../../tests/host-tools.js";
import { freePort } from "../../tests/hypervisor-harness.js";
import { allTargetsUp, checkDashboards, checkRules, prometheusApi, query, sleep, startMechanismLoad, waitFor } from "./stack-checks.js";

const ROOT = new URL("../../", import.meta.url).pathname;

test("the stack under a real Prometheus feeds every dashboard query, rule and alert", { timeout: 180_000 }, async (t) => {
  if (!needTools(t, missingCommands(["prometheus", "promtool"]), "apt-get install -y prometheus (Debian's package)")) return;
  const services: SpawnedService[] = [];
  let prometheus: ChildProcess | null = null;
  let load: { stop(): Promise<void> } | null = null;
  const dir = mkdtempSync(join(tmpdir(), "e2e-prom-"));
  try {
    const hvEnv = { HYPERVISOR_GRPC_PORT: "0", HYPERVISOR_HTTP_PORT: "0", HYPERVISOR_ANNOUNCE: "1" };
    const [hvA, hvB] = await Promise.all([spawnService("services/hypervisor/main.ts", hvEnv), spawnService("services/hypervisor/main.ts", hvEnv)]);
    services.push(hvA, hvB);
    const devEnv = (hv: SpawnedService) => ({ PTDEVICE_GRPC_PORT: "0", PTDEVICE_HTTP_PORT: "0", PTDEVICE_ANNOUNCE: "1", PTDEVICE_HYPERVISOR: hv.address });
    const [devA, devB] = await Promise.all([spawnService("services/page-tracking-device/main.ts", devEnv(hvA)), spawnService("services/page-tracking-device/main.ts", devEnv(hvB))]);
    services.push(devA, devB);
    const ctl = await spawnServe(hvA, hvB);
    services.push(ctl);

    const a = connectHypervisor(hvA.address);
    load = await startMechanismLoad(a);

    // Prometheus with the project's configuration; only the targets point at 127.0.0.1.
    cpSync(join(ROOT, "deploy/prometheus"), dir, { recursive: true });
    const targets = (list: SpawnedService[]) => JSON.stringify([{ targets: list.map((s) => `127.0.0.1:${s.httpPort}`) }]);
    writeFileSync(join(dir, "targets/hypervisor.json"), targets([hvA, hvB]));
    writeFileSync(join(dir, "targets/page-tracking-device.json"), targets([devA, devB]));
    writeFileSync(join(dir, "targets/migration-controller.json"), targets([ctl]));
    const port = await freePort();
    prometheus = spawn("prometheus", [`--config.file=${join(dir, "prometheus.yml")}`, `--storage.tsdb.path=${join(dir, "data")}`, `--web.listen-address=127.0.0.1:${port}`], { stdio: "ignore" });
    const api = prometheusApi(`http://127.0.0.1:${port}`);
    await waitFor("Prometheus to be ready", async () => (await fetch(`http://127.0.0.1:${port}/-/ready`)).ok, 20_000);

    // Let migrations complete and syncs happen while Prometheus scrapes every 2 s.
    const ctlMetrics = () => fetch(`http://127.0.0.1:${ctl.httpPort}/metrics`).then((r) => r.text());
    await waitFor("two completed migrations", async () => /migration_migrations_total\{result="completed",mechanism="bitmap\+device"\} ([2-9]|\d\d)/.test(await ctlMetrics()), 90_000);
    await waitFor("every target up", () => allTargetsUp(api), 20_000);
    await sleep(3000);

    // After two migrations the demo VM running now was created by a migration: it runs the guest's
    // workload (before vCPU state moved with the VM, a migrated VM sat idle and the dirty rates fell to 0).
    const b = connectHypervisor(hvB.address);
    await waitFor("the migrated demo VM to write", async () => {
      const found = await Promise.all([a, b].map((c) => c.getVm({ vm: "demo" }).then((r) => r.vm!, () => null)));
      return found.some((v) => v !== null && v.vcpus.some((x) => !x.paused) && v.vcpus.some((x) => x.writes > 0n));
    }, 20_000);
    b.close();

    await checkDashboards(api);
    await checkRules(api);
    const alert = await query(api, "migration_expected_downtime_seconds > on (vm) 2 * migration_downtime_limit_seconds and on (vm) migration_in_progress == 1");
    assert.equal(alert.status, "success", "the alert's expression evaluates");

    const families: [SpawnedService, string[]][] = [
      [hvA, ["grpc_client_handled_total", "grpc_server_started_total", "grpc_server_handled_total", "grpc_server_handling_seconds", "hypervisor_guest_writes_total", "hypervisor_pages_dirtied_total", "hypervisor_vcpu_pages_dirtied_total", "hypervisor_write_faults_total", "hypervisor_hardware_dirty_updates_total", "hypervisor_tlb_flushes_total", "hypervisor_dirty_ring_pushes_total", "hypervisor_dirty_ring_full_exits_total", "hypervisor_dirty_ring_harvested_entries_total", "hypervisor_dirty_ring_reset_entries_total", "hypervisor_dirty_log_sync_host_seconds", "hypervisor_sync_dirty_rate_pages_per_second", "hypervisor_vcpu_tracking_overhead_seconds_total", "hypervisor_vm_clock_seconds", "hypervisor_page_tracking_device_stream_lag_batches"]],
      [devA, ["grpc_server_handled_total", "ptdevice_trackers", "ptdevice_tracking_enabled_cpus", "ptdevice_gpas_observed_total", "ptdevice_gpas_logged_total", "ptdevice_buffer_gpas", "ptdevice_flushes_total", "ptdevice_log_overflows_total", "ptdevice_read_dirty_gpas", "ptdevice_read_dirty_seconds", "ptdevice_report_stream_lag_batches"]],
      [ctl, ["grpc_client_handled_total", "migration_migrations_total", "migration_round", "migration_remaining_bytes", "migration_transferred_bytes_total", "migration_dirty_rate_pages_per_second", "migration_expected_downtime_seconds", "migration_downtime_limit_seconds", "migration_downtime_seconds", "migration_total_time_seconds"]],
    ];
    for (const [s, names] of families) {
      const text = await fetch(`http://127.0.0.1:${s.httpPort}/metrics`).then((r) => r.text());
      for (const n of names) assert.match(text, new RegExp(`^# TYPE ${n} `, "m"), `${s.address} exposes ${n}`);
      const check = spawnSync("promtool", ["check", "metrics"], { input: text, encoding: "utf8" });
      assert.equal(check.status, 0, `promtool check metrics (${s.address}):\n${check.stdout}${check.stderr}`);
    }
    a.close();
  } finally {
    await load?.stop();
    prometheus?.kill("SIGTERM");
    for (const s of services.reverse()) await s.stop();
    rmSync(dir, { recursive: true, force: true });
  }
});

/** The controller's service, started as compose starts it (smaller VM, shorter pauses). */
function spawnServe(hvA: SpawnedService, hvB: SpawnedService): Promise<SpawnedService> {
  const env = { MIGRATION_ANNOUNCE: "1", MIGRATION_HYPERVISOR_A: hvA.address, MIGRATION_HYPERVISOR_B: hvB.address, MIGRATION_HTTP_PORT: "0", MIGRATION_GRPC_PORT: "0" };
  const args = ["serve", "--mechanism", "device", "--memory", "128MiB", "--pause-ms", "300", "--write-rate", "20000"];
  return spawnService("clients/migration-controller/main.ts", env, 20_000, args);
}
