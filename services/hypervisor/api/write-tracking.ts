/** Write tracking (seed 002): reference-counted tracked pages and the notifier stream. */
import { removeWriteTracking, writeTrackerOf } from "../model/write-track.js";
import { num } from "./convert.js";
import type { ApiContext, Handlers } from "./context.js";

export function writeTrackingHandlers(ctx: ApiContext): Pick<Handlers, "addWriteTracking" | "removeWriteTracking" | "watchWriteTracking" | "unwatchWriteTracking"> {
  const { hv } = ctx;
  return {
    addWriteTracking(req) {
      return { count: hv.addWriteTracking(hv.vm(req.vm), num(req.gfn, "gfn")) };
    },
    removeWriteTracking(req) {
      return { count: removeWriteTracking(hv.vm(req.vm), num(req.gfn, "gfn")) };
    },
    async *watchWriteTracking(req, ctx) {
      const tracker = writeTrackerOf(hv.vm(req.vm), "watch write tracking");
      const sub = tracker.subscribe();
      const onAbort = () => {
        if (tracker.subscribers.has(sub.id)) tracker.unsubscribe(sub.id);
      };
      ctx.signal.addEventListener("abort", onAbort, { once: true });
      try {
        let seq = 1;
        yield { seq: BigInt(seq++), subscriptionId: BigInt(sub.id) };
        for (;;) {
          await sub.wait();
          while (sub.queue.length) {
            const e = sub.queue.shift()!;
            yield e.kind === "write"
              ? {
                  seq: BigInt(seq++),
                  trackWrite: {
                    gpa: BigInt(e.gpa),
                    newValue: (BigInt(e.valueHi >>> 0) << 32n) | BigInt(e.valueLo >>> 0),
                    vcpu: e.vcpu,
                    timeNs: BigInt(Math.round(e.timeNs)),
                  },
                }
              : { seq: BigInt(seq++), trackRemoveRegion: { gfn: BigInt(e.gfn), nrPages: BigInt(e.nrPages) } };
          }
          if (sub.closed) {
            if (sub.closed.error) throw sub.closed.error;
            return;
          }
        }
      } finally {
        ctx.signal.removeEventListener("abort", onAbort);
        onAbort();
      }
    },
    unwatchWriteTracking(req) {
      writeTrackerOf(hv.vm(req.vm), "unwatch write tracking").unsubscribe(num(req.subscriptionId, "subscription_id"));
      return {};
    },
  };
}
