import { startHypervisor, GiB } from "./tests/hypervisor-harness.js";
import { migrate } from "./clients/migration-controller/migrate.js";
import { WorkloadPattern } from "./proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
const a = await startHypervisor(), b = await startHypervisor();
await a.client.createVm({ vm: "demo", vcpus: 4, memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(4 * GiB) }],
  workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_HOT_COLD, writesPerSecond: 50000, hotFraction: 0.05, hotWriteFraction: 0.9 } });
await a.client.advanceVm({ vm: "demo", durationNs: 1_000_000_000n });
for (const mech of ["bitmap", "bitmap-manual", "bitmap-initially-set"] as const) {
const t0 = performance.now();
try {
  const r = await migrate({ sourceVm: "demo", destinationVm: "demo-" + mech, mechanism: mech }, { source: a.client, destination: b.client, onProgress: (e) => console.log(e.phase, e.round, e.dirtyPages, (e.remainingBytes/2**20).toFixed(1), e.expectedDowntimeMs.toFixed(1)) });
  console.log(mech, r.status, r.totalTimeMs.toFixed(0), "ms downtime", r.downtimeMs?.toFixed(1), "rounds", r.dirtySyncCount, r.verification, "wall", (performance.now()-t0).toFixed(0));
  console.log(r.rounds.map(x => [x.round, x.dirtyPages, x.pagesSent, x.durationMs.toFixed(1), x.guestWritesPerSecond.toFixed(0)].join(" ")).join("\n"));
} catch (e: any) { console.log("ERR", e.kind, e.message); }
await a.client.resumeVm({ vm: "demo" });
}
await a.close(); await b.close();
