/** Post-copy on a destination VM: StartPostcopy, and the page requests as a stream. */
import { failedPrecondition } from "../../../common/errors.js";
import { Postcopy, type PageRequest } from "../model/postcopy.js";
import type { ApiContext, Handlers } from "./context.js";
import { num, vmInfo } from "./convert.js";

export function postcopyHandlers(ctx: ApiContext): Pick<Handlers, "startPostcopy" | "watchPageRequests"> {
  const { hv } = ctx;
  return {
    startPostcopy(req) {
      const vm = hv.vm(req.vm);
      const pages = [...vm.slots.values()].reduce((n, s) => n + s.npages, 0);
      hv.checkBudget(Postcopy.bytesFor(pages), `post-copy's page state for VM '${vm.name}'`);
      vm.startPostcopy(req.missing.map((m) => ({ slot: m.slot, bitmap: m.bitmap })));
      return { vm: vmInfo(vm) };
    },
    async *watchPageRequests(req, call) {
      const vm = hv.vm(req.vm);
      const pc = vm.postcopy;
      if (!pc) throw failedPrecondition(`watch page requests: VM ${vm.name} is not in post-copy`);
      // What one watcher can hold is bounded by the VM: one request per missing page at most.
      const queue: PageRequest[] = [];
      let wake: (() => void) | null = null;
      const stop = pc.watch(Math.max(1, num(req.fromSequence, "from_sequence")), (r) => {
        queue.push(r);
        wake?.();
      });
      const onAbort = () => wake?.();
      call.signal.addEventListener("abort", onAbort, { once: true });
      try {
        for (;;) {
          while (queue.length) {
            const r = queue.shift()!;
            yield { request: { sequence: BigInt(r.sequence), slot: r.slot, page: BigInt(r.page), gpa: BigInt(r.gpa), vcpu: r.vcpu, atNs: BigInt(Math.round(r.atNs)) } };
          }
          if (call.signal.aborted || vm.postcopy !== pc) return;
          // Post-copy ends inside an advance; look again now and then as well as on each request.
          await new Promise<void>((res) => {
            wake = res;
            setTimeout(res, 50).unref();
          });
          wake = null;
        }
      } finally {
        stop();
        call.signal.removeEventListener("abort", onAbort);
      }
    },
  };
}
