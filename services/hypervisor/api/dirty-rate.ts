/** QEMU's calc-dirty-rate and query-dirty-rate (model/dirty-rate.ts). */
import { setImmediate as yieldToEventLoop, setTimeout as sleep } from "node:timers/promises";
import { DomainError, invalidArgument } from "../../../common/errors.js";
import { DirtyRateMode, DirtyRateStatus, type DirtyRateInfo as DirtyRateInfoMsg } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { calcDirtyRate, CALC_TIME_MS, SAMPLE_PAGES, UNSTARTED, type DirtyRateInfo, type DirtyRateMode as Mode } from "../model/dirty-rate.js";
import type { Vm } from "../model/vm.js";
import type { ApiContext, Handlers } from "./context.js";
import { SLICE_MS } from "./vms.js";

const MODE: Record<number, Mode> = {
  [DirtyRateMode.DIRTY_RATE_MODE_UNSPECIFIED]: "page-sampling",
  [DirtyRateMode.DIRTY_RATE_MODE_PAGE_SAMPLING]: "page-sampling",
  [DirtyRateMode.DIRTY_RATE_MODE_DIRTY_BITMAP]: "dirty-bitmap",
  [DirtyRateMode.DIRTY_RATE_MODE_DIRTY_RING]: "dirty-ring",
};
const MODE_OUT: Record<Mode, DirtyRateMode> = {
  "page-sampling": DirtyRateMode.DIRTY_RATE_MODE_PAGE_SAMPLING,
  "dirty-bitmap": DirtyRateMode.DIRTY_RATE_MODE_DIRTY_BITMAP,
  "dirty-ring": DirtyRateMode.DIRTY_RATE_MODE_DIRTY_RING,
};
const STATUS_OUT: Record<DirtyRateInfo["status"], DirtyRateStatus> = {
  unstarted: DirtyRateStatus.DIRTY_RATE_STATUS_UNSTARTED,
  measuring: DirtyRateStatus.DIRTY_RATE_STATUS_MEASURING,
  measured: DirtyRateStatus.DIRTY_RATE_STATUS_MEASURED,
};

function toProto(i: DirtyRateInfo): DirtyRateInfoMsg {
  return {
    status: STATUS_OUT[i.status],
    dirtyRate: BigInt(i.dirtyRateMiBps),
    startTimeNs: BigInt(Math.round(i.startTimeNs)),
    calcTimeMs: i.calcTimeMs,
    samplePages: i.samplePages,
    mode: MODE_OUT[i.mode],
    vcpuDirtyRate: i.vcpuDirtyRateMiBps.map((r, id) => ({ id, dirtyRate: BigInt(r) })),
    dirtyPages: BigInt(i.dirtyPages),
    dirtyBytesPerSecond: i.dirtyBytesPerSecond,
    guestWritesPerSecondBefore: i.guestWritesPerSecondBefore,
    guestWritesPerSecondDuring: i.guestWritesPerSecondDuring,
  };
}

export function dirtyRateHandlers(ctx: ApiContext): Pick<Handlers, "calcDirtyRate" | "queryDirtyRate"> {
  const { hv } = ctx;
  return {
    async calcDirtyRate(req, call) {
      const vm = hv.vm(req.vm);
      const mode = MODE[req.mode];
      if (!mode) throw invalidArgument(`calc-dirty-rate: unknown mode ${req.mode}`);
      // The guest runs for the measurement: a stepped VM in AdvanceVm's slices, a real-time one on its own.
      const runGuest = async (ns: number) => {
        const cancelled = () => {
          if (call.signal.aborted) throw new DomainError("aborted", `calc-dirty-rate: the call was cancelled or its deadline passed; VM ${vm.name} is left as it was`);
        };
        if (vm.config.clock === "stepped") {
          await hv.advance(vm, ns, SLICE_MS, async () => (await yieldToEventLoop(), cancelled()));
          // A short run (the ring mode's steps) ends inside one slice: yield anyway, so that other calls and a cancellation get in.
          await yieldToEventLoop();
        } else await sleep(ns / 1e6 / vm.config.realtimeSpeed, undefined, { signal: call.signal }).catch(cancelled);
        cancelled();
      };
      const setSlotFlags = (slot: number, flags: number) => {
        const s = vm.slots.get(slot)!;
        hv.setUserMemoryRegion(vm, { slot, gpa: s.gpa, size: s.size, flags });
      };
      const info = await calcDirtyRate(vm, { calcTimeMs: req.calcTimeMs || CALC_TIME_MS.default, samplePages: req.samplePages || SAMPLE_PAGES.default, mode }, setSlotFlags, runGuest);
      return { info: toProto(info) };
    },
    queryDirtyRate(req) {
      const vm: Vm = hv.vm(req.vm);
      return { info: toProto(vm.dirtyRate ?? UNSTARTED) };
    },
  };
}
