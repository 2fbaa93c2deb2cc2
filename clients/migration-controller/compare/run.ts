/**
 * Runs a comparison: each cell creates the guest on one hypervisor, migrates
 * it to a second VM on the same hypervisor, and is summed up. Cells run in
 * parallel, one at a time per hypervisor: on `jobs` hypervisor processes
 * started here, or on hypervisors already running at the given addresses.
 * A cell that fails is a result with its reason; the others still run.
 */
import { totalmem } from "node:os";
import type { ClientOptions } from "../../../common/client.js";
import { spawnService, type SpawnedService } from "../../../common/spawn.js";
import type { VmInfo } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { connectHypervisor, type HypervisorClient } from "../../../services/hypervisor/client.js";
import { createDemoVm, type GuestSpec } from "../demo-vm.js";
import { migrate, MigrationError, type MigrationReport } from "../migrate.js";
import { formatBytes } from "../report.js";
import { cellMemoryBytes, MatrixError, type Cell } from "./matrix.js";

export interface CompareOptions {
  guest: Omit<GuestSpec, "arch">;
  cells: Cell[];
  /** Hypervisors to start on 127.0.0.1; ignored when addresses are given. */
  jobs: number;
  /** Running hypervisors to use instead (each needs a page-tracking device beside it for the device cells). */
  addresses?: string[];
  clientOptions?: ClientOptions;
  signal?: AbortSignal;
  /** Called as each cell ends, in the order they end. */
  onCell?: (r: CellResult, done: number, of: number) => void;
}

/** What one cell did, in the figures a comparison ranks by. */
export interface CellResult {
  cell: Cell;
  status: "completed" | "failed";
  error: string | null;
  /** Guest time from the start to the destination running, ms. */
  totalTimeMs: number;
  downtimeMs: number | null;
  dirtySyncCount: number;
  transferredBytes: number;
  /** Share of the guest's writes (at its untracked rate) that did not happen while it was tracked, 0 to 1. */
  guestSlowdown: number;
  /** Guest time the vCPUs lost to tracking: faults, TLB refills, full rings, throttling, post-copy waits; ms summed over vCPUs. */
  vcpuTimeLostMs: number;
  /** Host time the syncs took (GET, CLEAR, harvest, reset), ms. */
  syncHostMs: number;
  ringFullExits: number;
  pmlFullExits: number;
  hdbssFullFaults: number;
  verified: boolean;
  /** At each sync: the guest time, the bytes still to send and the dirty rate (the report's charts). */
  series: { timeMs: number; remainingBytes: number; dirtyRatePagesPerSecond: number }[];
  /** Wall time the cell took, ms (not part of the deterministic figures). */
  wallTimeMs: number;
}

interface Host {
  client: HypervisorClient;
  address: string;
}

/** Half this machine's RAM, shared by the hypervisors started here (as one hypervisor's default budget). */
export const localBudgetPerHypervisor = (jobs: number) => Math.floor(totalmem() / 2 / jobs);

/** Refuses, before anything starts, a cell that would not fit one local hypervisor's budget. */
export function checkBudget(o: Pick<CompareOptions, "guest" | "cells" | "jobs" | "addresses">): void {
  if (o.addresses?.length) return;
  const budget = localBudgetPerHypervisor(o.jobs);
  for (const c of o.cells) {
    const need = cellMemoryBytes(o.guest, c.mechanism);
    if (need > budget) {
      throw new MatrixError(
        `cell ${c.index} (${c.arch} ${c.mechanism.name}) needs about ${formatBytes(need)} of hypervisor memory (source, destination, snapshot), ` +
          `over the ${formatBytes(budget)} each of ${o.jobs} hypervisor${o.jobs > 1 ? "s" : ""} gets of half this machine's RAM: lower --memory or --jobs`,
      );
    }
  }
}

export async function runComparison(o: CompareOptions): Promise<{ results: CellResult[]; wallTimeMs: number }> {
  if (o.cells.length === 0) throw new MatrixError("the matrix has no cells");
  checkBudget(o);
  const wall0 = performance.now();
  const services: Started[] = [];
  const hosts: Host[] = [];
  try {
    const addresses = o.addresses?.length ? o.addresses : await startLocal(o, services);
    for (const address of addresses) hosts.push({ address, client: connectHypervisor(address, o.clientOptions) });
    const results: CellResult[] = new Array(o.cells.length);
    let next = 0;
    let done = 0;
    await Promise.all(
      hosts.map(async (h) => {
        while (next < o.cells.length && !o.signal?.aborted) {
          const cell = o.cells[next++];
          results[cell.index] = await runCell(h, cell, o.guest, o.signal);
          o.onCell?.(results[cell.index], ++done, o.cells.length);
        }
      }),
    );
    return { results: results.filter(Boolean), wallTimeMs: performance.now() - wall0 };
  } finally {
    for (const h of hosts) h.client.close();
    // Devices first: they unregister from hypervisors that are still there.
    const devices = services.filter((s) => s.kind === "device");
    await Promise.all(devices.map((s) => s.service.stop()));
    await Promise.all(services.filter((s) => s.kind === "hypervisor").map((s) => s.service.stop()));
  }
}

interface Started {
  kind: "hypervisor" | "device";
  service: SpawnedService;
}

async function startLocal(o: CompareOptions, services: Started[]): Promise<string[]> {
  const n = Math.min(o.jobs, o.cells.length);
  const env = {
    HYPERVISOR_GRPC_PORT: "0",
    HYPERVISOR_HTTP_PORT: "0",
    HYPERVISOR_ANNOUNCE: "1",
    HYPERVISOR_HOST: "127.0.0.1",
    HYPERVISOR_MEMORY_BUDGET: String(localBudgetPerHypervisor(o.jobs)),
  };
  const hvs = await Promise.all(Array.from({ length: n }, () => spawnService("services/hypervisor/main.ts", env)));
  services.push(...hvs.map((service) => ({ kind: "hypervisor" as const, service })));
  if (o.cells.some((c) => c.mechanism.assist === "device")) {
    const devEnv = (hv: SpawnedService) => ({ PTDEVICE_GRPC_PORT: "0", PTDEVICE_HTTP_PORT: "0", PTDEVICE_ANNOUNCE: "1", PTDEVICE_HYPERVISOR: hv.address });
    const devices = await Promise.all(hvs.map((hv) => spawnService("services/page-tracking-device/main.ts", devEnv(hv))));
    services.push(...devices.map((service) => ({ kind: "device" as const, service })));
  }
  return hvs.map((s) => s.address);
}

/** Guest-time counters of a VM's vCPUs, summed: what tracking cost them, and the hardware logs' exits. */
function counters(vm: VmInfo | undefined) {
  const sum = (f: (c: VmInfo["vcpus"][number]) => bigint) => (vm ? vm.vcpus.reduce((n, c) => n + Number(f(c)), 0) : 0);
  return {
    lostNs: sum((c) => c.trackingOverheadNs + c.dirtyRingStallNs + c.cpuThrottleNs + c.dirtyLimitSleepNs),
    ringFullExits: sum((c) => c.dirtyRingFullExits),
    pmlFullExits: sum((c) => c.pmlFullExits),
    hdbssFullFaults: sum((c) => c.hdbssFullFaults),
  };
}

async function runCell(h: Host, cell: Cell, guest: Omit<GuestSpec, "arch">, signal: AbortSignal | undefined): Promise<CellResult> {
  const wall0 = performance.now();
  const vm = `cmp${cell.index}`;
  const dst = `${vm}-dst`;
  let report: MigrationReport | undefined;
  let error: string | null = null;
  let baseline = 0;
  let before: VmInfo | undefined;
  let after: VmInfo | undefined;
  try {
    baseline = await createDemoVm(h.client, vm, { ...guest, arch: cell.arch }, cell.mechanism, { signal });
    before = (await h.client.getVm({ vm })).vm;
    try {
      report = await migrate({ ...cell.config, sourceVm: vm, destinationVm: dst }, { source: h.client, destination: h.client, signal });
    } catch (err) {
      if (!(err instanceof MigrationError)) throw err;
      report = err.report;
      error = err.message;
    }
    after = (await h.client.getVm({ vm })).vm;
  } catch (err) {
    const e = err as { details?: string; message?: string };
    error ??= `hypervisor ${h.address}: ${e.details ?? e.message ?? String(err)}`;
  } finally {
    for (const name of [dst, vm]) await h.client.destroyVm({ vm: name }).catch(() => undefined);
  }
  return summarize(cell, report, error, baseline, before, after, performance.now() - wall0);
}

function summarize(cell: Cell, r: MigrationReport | undefined, error: string | null, baseline: number, before: VmInfo | undefined, after: VmInfo | undefined, wallTimeMs: number): CellResult {
  const b = counters(before);
  const a = after ? counters(after) : b;
  const rounds = r?.rounds ?? [];
  // Rounds the guest ran through (not the stop-and-copy, when it was paused): its writes then, against its rate untracked.
  const running = rounds.filter((x) => !x.stopAndCopy);
  const ms = running.reduce((n, x) => n + x.durationMs, 0);
  const writes = running.reduce((n, x) => n + (x.guestWritesPerSecond * x.durationMs) / 1e3, 0);
  let t = r?.setupTimeMs ?? 0;
  const series = rounds.map((x) => {
    const point = { timeMs: t, remainingBytes: x.remainingBytes, dirtyRatePagesPerSecond: x.dirtyRatePagesPerSecond };
    t += x.durationMs;
    return point;
  });
  const postcopyWaitMs = r?.postcopy?.vcpuBlocktimeMs.reduce((n, x) => n + x, 0) ?? 0;
  return {
    cell,
    status: r?.status === "completed" && !error ? "completed" : "failed",
    error,
    totalTimeMs: r?.totalTimeMs ?? 0,
    downtimeMs: r?.downtimeMs ?? null,
    dirtySyncCount: r?.dirtySyncCount ?? 0,
    transferredBytes: r?.transferredBytes ?? 0,
    guestSlowdown: baseline > 0 && ms > 0 ? Math.max(0, 1 - writes / ((baseline * ms) / 1e3)) : 0,
    vcpuTimeLostMs: (a.lostNs - b.lostNs) / 1e6 + postcopyWaitMs,
    syncHostMs: rounds.reduce((n, x) => n + x.syncHostMs, 0),
    ringFullExits: a.ringFullExits - b.ringFullExits,
    pmlFullExits: a.pmlFullExits - b.pmlFullExits,
    hdbssFullFaults: a.hdbssFullFaults - b.hdbssFullFaults,
    verified: r?.verification?.match === true,
    series,
    wallTimeMs,
  };
}
