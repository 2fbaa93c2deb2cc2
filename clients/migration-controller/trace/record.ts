/**
 * Records what a running VM dirties, interval by interval, into a trace
 * (format.ts): per vCPU from its dirty ring when the VM has rings, per VM
 * from the dirty bitmap otherwise. Logging is on only while recording and is
 * turned off however the recording ends. A stepped VM is advanced by the
 * recorder (rings reaped every 5 ms of guest time, as the ring tracker does,
 * so no vCPU sits long on a full ring); a real-time one is waited for.
 */
import { ClockDrive, type VmInfo } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import type { HypervisorClient } from "../../../services/hypervisor/client.js";
import type { TraceFile } from "./format.js";

const LOG_DIRTY_PAGES = 1;
const REAP_STEP_NS = 5_000_000;

export interface RecordOptions {
  intervalNs: number;
  intervals: number;
  signal?: AbortSignal;
  onInterval?: (k: number) => void;
}

/** Where each slot's pages start among the VM's writable pages (in guest-physical order, as the workloads count them). */
function slotBases(vm: VmInfo): Map<number, number> {
  const bases = new Map<number, number>();
  let at = 0;
  for (const s of [...vm.memslots].sort((a, b) => Number(a.memslot!.guestPhysAddr - b.memslot!.guestPhysAddr))) {
    if (s.memslot!.flags & 2) continue; // read-only slots are not written
    bases.set(s.memslot!.slot, at);
    at += Number(s.numPages);
  }
  return bases;
}

const sleep = (ms: number, signal?: AbortSignal) => new Promise<void>((resolve) => {
  const t = setTimeout(resolve, ms);
  signal?.addEventListener("abort", () => (clearTimeout(t), resolve()), { once: true });
});

export async function recordTrace(hv: HypervisorClient, name: string, o: RecordOptions): Promise<TraceFile> {
  const vm = (await hv.getVm({ vm: name })).vm!;
  const bases = slotBases(vm);
  const guestPages = [...bases.keys()].reduce((n, slot) => n + Number(vm.memslots.find((s) => s.memslot!.slot === slot)!.numPages), 0);
  const slots = vm.memslots.filter((s) => bases.has(s.memslot!.slot));
  if (slots.some((s) => s.logging)) throw new Error(`VM '${name}' is logging already (a migration or another tool is using its dirty log)`);
  const rings = vm.dirtyRingBytes > 0n;
  const stepped = vm.clock !== ClockDrive.CLOCK_DRIVE_REALTIME;
  const vcpus = rings ? vm.vcpus.length : 1;
  const setLogging = (on: boolean) =>
    Promise.all(slots.map((s) => hv.setUserMemoryRegion({ vm: name, memslot: { ...s.memslot!, flags: on ? s.memslot!.flags | LOG_DIRTY_PAGES : s.memslot!.flags & ~LOG_DIRTY_PAGES } })));
  const pages: Uint32Array[][] = [];
  await setLogging(true);
  try {
    const seen = Array.from({ length: vcpus }, () => new Set<number>());
    const reap = async () => {
      if (!rings) return;
      for (let v = 0; v < vm.vcpus.length; v++) {
        const r = await hv.harvestDirtyRing({ vm: name, vcpu: v });
        const dv = new DataView(r.entries.buffer, r.entries.byteOffset, r.entries.byteLength);
        for (let i = 0; i < r.count; i++) seen[v].add(bases.get(dv.getUint32(16 * i + 4, true))! + Number(dv.getBigUint64(16 * i + 8, true)));
      }
      await hv.resetDirtyRings({ vm: name });
    };
    if (!rings) for (const s of slots) await hv.getDirtyLog({ vm: name, slot: s.memslot!.slot });
    for (let k = 0; k < o.intervals && !o.signal?.aborted; k++) {
      if (stepped) {
        for (let done = 0; done < o.intervalNs; done += REAP_STEP_NS) {
          await hv.advanceVm({ vm: name, durationNs: BigInt(Math.min(REAP_STEP_NS, o.intervalNs - done)) }, { deadlineMs: 600_000, signal: o.signal });
          await reap();
        }
      } else {
        await sleep(o.intervalNs / 1e6 / (vm.realtimeSpeed || 1), o.signal);
        await reap();
      }
      if (!rings) {
        for (const s of slots) {
          const bm = (await hv.getDirtyLog({ vm: name, slot: s.memslot!.slot })).bitmap;
          const base = bases.get(s.memslot!.slot)!;
          for (let i = 0; i < bm.length; i++) for (let b = bm[i], j = 0; b; b >>= 1, j++) if (b & 1) seen[0].add(base + 8 * i + j);
        }
      }
      pages.push(seen.map((set) => Uint32Array.from([...set].sort((a, b) => a - b))));
      for (const set of seen) set.clear();
      o.onInterval?.(k);
    }
  } finally {
    // Rings are emptied before logging goes off, so that no vCPU is left out on a full one.
    if (rings) {
      for (let v = 0; v < vm.vcpus.length; v++) await hv.harvestDirtyRing({ vm: name, vcpu: v }).catch(() => undefined);
      await hv.resetDirtyRings({ vm: name }).catch(() => undefined);
    }
    await setLogging(false);
  }
  return { vcpus, perVm: !rings, intervalNs: o.intervalNs, guestPages, pages };
}
