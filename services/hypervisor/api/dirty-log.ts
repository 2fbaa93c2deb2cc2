/** The dirty-log interfaces: GET and CLEAR of the bitmap, the rings' harvest and reset, writes without a vCPU. */
import { resourceExhausted } from "../../../common/errors.js";
import { checkNotMeasuring } from "../model/dirty-rate.js";
import { harvestRing, kickVcpus, resetDirtyRings } from "../model/dirty-ring.js";
import { asBuffer, LOG_TARGET_OUT, num } from "./convert.js";
import type { ApiContext, Handlers } from "./context.js";

export function dirtyLogHandlers(ctx: ApiContext): Pick<Handlers, "getDirtyLog" | "clearDirtyLog" | "harvestDirtyRing" | "resetDirtyRings" | "kickVcpus" | "hostWrite"> {
  const { hv, metrics } = ctx;
  return {
    async getDirtyLog(req) {
      const vm = hv.vm(req.vm);
      checkNotMeasuring(vm, "GET_DIRTY_LOG");
      const slot = vm.slots.get(req.slot);
      // Refused before anything is synced or cleared: a bitmap that cannot be sent must not be lost.
      if (slot && slot.bitmapBytes + 1024 > ctx.maxMessageBytes) {
        throw resourceExhausted(
          `GET_DIRTY_LOG: slot ${req.slot}'s bitmap is ${slot.bitmapBytes} bytes, over the ${ctx.maxMessageBytes}-byte message limit; ` +
            "split the memory into smaller slots (at most 2 TiB each), or use manual protect and CLEAR_DIRTY_LOG by range",
          "E2BIG",
        );
      }
      const r = await hv.getDirtyLog(vm, req.slot, req.vcpusRun);
      for (const [iface, ns] of Object.entries(r.costs)) metrics.syncHostSeconds.observe({ vm: vm.name, interface: iface }, ns / 1e9);
      const rate = ctx.lastGet.rate(vm, req.slot, r.dirtyPages);
      if (rate !== null) metrics.setSyncDirtyRate(vm.name, req.slot, vm.mechanism, rate);
      return {
        bitmap: asBuffer(r.bitmap),
        numPages: BigInt(r.numPages),
        dirtyPages: BigInt(r.dirtyPages),
        pagesWriteProtected: BigInt(r.pagesWriteProtected),
        tlbFlushed: r.tlbFlushed,
        hostNs: BigInt(Math.round(r.hostNs)),
        pagesSynced: BigInt(r.pagesSynced),
        vcpusRan: r.vcpusRan,
      };
    },
    async clearDirtyLog(req) {
      const vm = hv.vm(req.vm);
      checkNotMeasuring(vm, "CLEAR_DIRTY_LOG");
      const r = await hv.clearDirtyLog(vm, req.slot, num(req.firstPage, "first_page"), req.numPages, req.bitmap, req.vcpusRun);
      metrics.syncHostSeconds.observe({ vm: vm.name, interface: "clear" }, r.hostNs / 1e9);
      return { pagesCleared: BigInt(r.pagesCleared), tlbFlushed: r.tlbFlushed, hostNs: BigInt(Math.round(r.hostNs)), vcpusRan: r.vcpusRan };
    },
    kickVcpus(req) {
      const r = kickVcpus(hv.vm(req.vm));
      return { kicked: r.kicked, hostNs: BigInt(r.hostNs) };
    },
    harvestDirtyRing(req) {
      const vm = hv.vm(req.vm);
      checkNotMeasuring(vm, "harvest dirty ring");
      const r = harvestRing(vm, req.vcpu, req.maxEntries, req.vcpusRun);
      metrics.ringHarvested.inc({ vm: req.vm }, r.count);
      return { entries: asBuffer(r.entries), count: r.count, hostNs: BigInt(Math.round(r.hostNs)), vcpusRan: r.vcpusRan };
    },
    resetDirtyRings(req) {
      const vm = hv.vm(req.vm);
      checkNotMeasuring(vm, "RESET_DIRTY_RINGS");
      const r = resetDirtyRings(vm, req.vcpusRun);
      metrics.ringResetEntries.inc({ vm: vm.name }, r.cleared);
      metrics.syncHostSeconds.observe({ vm: vm.name, interface: "ring_reset" }, r.hostNs / 1e9);
      return { cleared: BigInt(r.cleared), tlbFlushed: r.tlbFlushed, hostNs: BigInt(Math.round(r.hostNs)), vcpusRan: r.vcpusRan };
    },
    hostWrite(req) {
      const vm = hv.vm(req.vm);
      const targets = vm.hostWrite(req.writes.map((w) => ({ gpa: num(w.gpa, "gpa"), value: w.value })));
      return { logged: targets.map((t) => LOG_TARGET_OUT[t]) };
    },
  };
}
