/**
 * What both stack tests (processes on 127.0.0.1, and docker compose) check
 * through a real Prometheus: every dashboard query answers with non-zero data
 * where the stack is active, and every rule loads. And the load that keeps
 * every mechanism's panels active: VMs a VMM-like collector keeps collecting.
 */
import assert from "node:assert/strict";
import { Arch, Capability, ClockDrive, MemslotFlag, WorkloadPattern } from "../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import type { HypervisorClient } from "../../services/hypervisor/client.js";
import { allQueries } from "../grafana/dashboards.js";

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export async function waitFor(what: string, check: () => Promise<boolean>, timeoutMs: number): Promise<void> {
  const until = Date.now() + timeoutMs;
  while (Date.now() < until) {
    if (await check().catch(() => false)) return;
    await sleep(250);
  }
  assert.fail(`timed out waiting for ${what}`);
}

export type PromApi = (path: string) => Promise<{ status: string; data: any; error?: string }>;

export const prometheusApi =
  (base: string): PromApi =>
  async (path) =>
    (await fetch(`${base}${path}`).then((r) => r.json())) as { status: string; data: any; error?: string };

export const query = (api: PromApi, expr: string) => api(`/api/v1/query?query=${encodeURIComponent(expr)}`);

/** Sum of an instant vector's samples (0 when it has none). */
export async function queryValue(api: PromApi, expr: string): Promise<number> {
  const r = await query(api, expr);
  return r.data.result.reduce((s: number, x: { value: [number, string] }) => s + Number(x.value[1]), 0);
}

/**
 * Long-lived VMs on one hypervisor so that every mechanism's series exist: a
 * ring (small, so it fills), DBM, the device, HDBSS and x86 PML; and the host
 * side of them, as a VMM's would be, so that their panels stay active: a
 * collection of every log and a harvest and reset of the ring, every second.
 */
export async function startMechanismLoad(hv: HypervisorClient): Promise<{ stop(): Promise<void> }> {
  const slot = { slot: 0, guestPhysAddr: BigInt(2 ** 30), memorySize: BigInt(64 * 2 ** 20), flags: MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES };
  const workload = { pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, writesPerSecond: 20_000 };
  const realtime = { vcpus: 2, clock: ClockDrive.CLOCK_DRIVE_REALTIME };
  await hv.createVm({ vm: "ring-vm", ...realtime, workload, dirtyRing: { capability: Capability.CAPABILITY_DIRTY_LOG_RING_ACQ_REL, bytes: 65536n }, memslots: [slot] });
  for (const [vm, capability, args] of [
    ["dbm-vm", Capability.CAPABILITY_ARM_HW_DIRTY_LOG, [1n]],
    ["dev-vm", Capability.CAPABILITY_ARM_PAGE_TRACKING_DEVICE, [1n]],
    ["hdbss-vm", Capability.CAPABILITY_ARM_HW_DIRTY_STATE_TRACK, [0n, 1n]],
  ] as const) {
    await hv.createVm({ vm, ...realtime });
    await hv.enableCap({ vm, capability, args: [...args] });
    await hv.setUserMemoryRegion({ vm, memslot: slot });
    await hv.setWorkload({ vm, workload });
  }
  await hv.createVm({ vm: "pml-vm", ...realtime, arch: Arch.ARCH_X86_64, pml: true, workload, memslots: [slot] });
  let collecting = true;
  const collector = (async () => {
    while (collecting) {
      for (const vm of ["dbm-vm", "dev-vm", "hdbss-vm", "pml-vm"]) await hv.getDirtyLog({ vm, slot: 0 }).catch(() => undefined);
      for (const vcpu of [0, 1]) await hv.harvestDirtyRing({ vm: "ring-vm", vcpu }).catch(() => undefined);
      await hv.resetDirtyRings({ vm: "ring-vm" }).catch(() => undefined);
      await sleep(1000);
    }
  })();
  return {
    async stop() {
      collecting = false;
      await collector;
    },
  };
}

/**
 * Panels that read 0 on a healthy stack running serve with the device mechanism and no policy:
 * failures and losses that did not happen, and the policies this stack does not run.
 */
const QUIET = [
  /^Log overflows and lost devices/,
  /^Auto-converge/,
  /^Dirty-limit/,
  /^Post-copy active/,
  // Backlog gauges: a device that keeps up has none, and its buffers and log empty at every read.
  /^Report stream lag/,
  /^Buffers and logs/,
];

/**
 * Every dashboard query parses, returns data, and reads non-zero unless its panel is one of QUIET's.
 * The recording rules' 1-minute rates need a few scrapes and evaluations of a new series: the
 * panels get up to a minute and a half to get there, then the last answers are judged.
 */
export async function checkDashboards(api: PromApi): Promise<void> {
  let empty: string[] = [];
  let zero: string[] = [];
  const judge = async () => {
    empty = [];
    zero = [];
    for (const q of allQueries()) {
      const r = await query(api, q.expr);
      assert.equal(r.status, "success", `${q.dashboard} / ${q.panel}: ${q.expr}: ${r.error}`);
      if (r.data.result.length === 0) empty.push(`${q.dashboard} / ${q.panel}: ${q.expr}`);
      else if (r.data.result.every((x: { value: [number, string] }) => Number(x.value[1]) === 0) && !QUIET.some((re) => re.test(q.panel))) zero.push(`${q.dashboard} / ${q.panel}: ${q.expr}`);
    }
    return empty.length === 0 && zero.length === 0;
  };
  const until = Date.now() + 90_000;
  while (!(await judge()) && Date.now() < until) await sleep(1000);
  assert.deepEqual(empty, [], "every panel query returns data");
  assert.deepEqual(zero, [], "every panel of an active part of the stack reads non-zero");
}

/** Every rule of deploy/prometheus/rules.yml is loaded and healthy. */
export async function checkRules(api: PromApi): Promise<void> {
  const rules = await api("/api/v1/rules");
  const loaded = rules.data.groups.flatMap((g: { rules: { name: string; health: string; type: string }[] }) => g.rules);
  assert.deepEqual(
    loaded.map((r: { name: string }) => r.name).sort(),
    ["MigrationNotConverging", "MigrationOverDowntimeLimit", "MigrationVerificationFailed", "PageTrackingDeviceLost", "vm:hypervisor_write_faults:rate1m", "vm_mechanism:hypervisor_dirty_bytes:rate1m", "vm_mechanism:hypervisor_pages_dirtied:rate1m", "vm_vcpu:hypervisor_vcpu_pages_dirtied:rate1m"],
  );
  for (const r of loaded) assert.equal(r.health, "ok", `rule ${r.name}`);
}

/** Every scrape target of the stack (two hypervisors, two devices, the controller) is up. */
export async function allTargetsUp(api: PromApi): Promise<boolean> {
  const r = await query(api, "up");
  return r.data.result.length === 5 && r.data.result.every((s: { value: [number, string] }) => s.value[1] === "1");
}
