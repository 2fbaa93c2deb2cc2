/**
 * The guest the demo and `compare` migrate: created with the log its
 * mechanism needs, every page touched first (as a booted OS with a page cache
 * would have), then its workload set and run for a second before migrating.
 * The same description and seed give the same guest, which is what lets
 * `compare` set mechanisms side by side.
 */
import { Arch, BackingPageSize, Capability, WorkloadPattern, type Workload } from "../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import type { HypervisorClient } from "../../services/hypervisor/client.js";
import { guestMemslots, ipaBitsFor } from "./guest.js";
import type { MechanismSpec } from "./trackers/mechanism.js";
import { withRate } from "./workloads.js";

export interface GuestSpec {
  memoryBytes: number;
  vcpus: number;
  arch: "arm64" | "x86_64";
  backing: "4k" | "2m" | "1g";
  /** Every vCPU's workload (workloads.ts); vCPU 0's at its own rate when noisyWritesPerSecond is set. */
  workload: Workload;
  noisyWritesPerSecond: number | null;
  /** Each vCPU's own workload instead (a replayed trace); null: `workload` on every vCPU. */
  vcpuWorkloads: Workload[] | null;
  seed: number;
  /** Dirty-ring entries per vCPU, used when the mechanism logs to rings. */
  ringEntries: number;
}

export const BACKINGS: Record<GuestSpec["backing"], BackingPageSize> = {
  "4k": BackingPageSize.BACKING_PAGE_SIZE_4K,
  "2m": BackingPageSize.BACKING_PAGE_SIZE_2M,
  "1g": BackingPageSize.BACKING_PAGE_SIZE_1G,
};

/** Guest time the workload runs before the migration starts: its rate is measured over it. */
export const WARMUP_NS = 1_000_000_000;

interface CallOptions {
  signal?: AbortSignal;
}

/**
 * Creates and warms up VM `name` on `hv`; returns the guest's writes per
 * second over the warm-up, with logging off (what `compare` counts a
 * mechanism's slowdown against).
 */
export async function createDemoVm(hv: HypervisorClient, name: string, g: GuestSpec, mechanism: MechanismSpec, opts: CallOptions = {}): Promise<number> {
  const long = { deadlineMs: 3_600_000, signal: opts.signal };
  await hv.createVm({
    vm: name,
    vcpus: g.vcpus,
    seed: BigInt(g.seed),
    arch: g.arch === "x86_64" ? Arch.ARCH_X86_64 : Arch.ARCH_ARM64,
    backingPageSize: BACKINGS[g.backing],
    pml: mechanism.assist === "pml",
    ipaBits: ipaBitsFor(g.memoryBytes),
    memslots: guestMemslots(g.memoryBytes),
    // Rings exist only if the VM is created with them (KVM enables them before vCPUs).
    dirtyRing: mechanism.log === "ring" ? { capability: Capability.CAPABILITY_DIRTY_LOG_RING_ACQ_REL, bytes: BigInt(g.ringEntries * 16), withBitmap: true } : undefined,
    workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: 1e8 },
  });
  // Until every page is mapped: a first touch costs what the hypervisor's cost model says (a calibrated host's may be 20 us).
  const pagesPerVcpu = Math.ceil(g.memoryBytes / 4096 / g.vcpus);
  let step = pagesPerVcpu * (10 + 2430) + 1e6;
  for (;;) {
    await hv.advanceVm({ vm: name, durationNs: BigInt(Math.ceil(step)) }, long);
    const slots = (await hv.getVm({ vm: name })).vm!.memslots;
    const mapped = slots.reduce((n, s) => n + Number(s.mappedPages4k) + 512 * Number(s.mappedBlocks2m) + 262144 * Number(s.mappedBlocks1g), 0);
    const total = slots.reduce((n, s) => n + Number(s.numPages), 0);
    if (mapped >= total) break;
    step = (step * (total - mapped)) / Math.max(mapped, 1) + 1e6;
  }
  if (g.vcpuWorkloads) for (const [vcpu, workload] of g.vcpuWorkloads.entries()) await hv.setWorkload({ vm: name, vcpu, workload });
  else await hv.setWorkload({ vm: name, workload: g.workload });
  if (g.noisyWritesPerSecond !== null) await hv.setWorkload({ vm: name, vcpu: 0, workload: withRate(g.workload, g.noisyWritesPerSecond) });
  const before = await writes(hv, name);
  await hv.advanceVm({ vm: name, durationNs: BigInt(WARMUP_NS) }, long);
  return ((await writes(hv, name)) - before) / (WARMUP_NS / 1e9);
}

async function writes(hv: HypervisorClient, name: string): Promise<number> {
  return (await hv.getVm({ vm: name })).vm!.vcpus.reduce((n, c) => n + Number(c.writes), 0);
}
