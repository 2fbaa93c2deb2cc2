/** Guest memory as the VMM reads and writes it, and the digest that proves two VMs equal. */
import { setImmediate as yieldToEventLoop } from "node:timers/promises";
import { invalidArgument } from "../../../common/errors.js";
import { DEFAULT_CHUNK_PAGES, digest, readMemory, writeMemory } from "../model/guest-memory.js";
import type { Vm } from "../model/vm.js";
import { asBuffer, num } from "./convert.js";
import type { ApiContext, Handlers } from "./context.js";

export function memoryHandlers(ctx: ApiContext): Pick<Handlers, "readMemory" | "writeMemory" | "getMemoryDigest"> {
  const { hv, metrics } = ctx;
  return {
    async *readMemory(req) {
      const vm = hv.vm(req.vm);
      const chunks = readMemory(
        vm,
        req.slot,
        num(req.firstPage, "first_page"),
        num(req.numPages, "num_pages"),
        req.bitmap,
        req.chunkPages || DEFAULT_CHUNK_PAGES,
      );
      for (const c of chunks) {
        metrics.memoryCopiedPages.inc({ vm: vm.name, direction: "read" }, c.contents.byteLength / 8);
        yield { chunk: { slot: c.slot, firstPage: BigInt(c.firstPage), numPages: c.numPages, bitmap: asBuffer(c.bitmap), contents: asBuffer(c.contents), arriveAtNs: 0n } };
      }
    },
    async writeMemory(reqs) {
      let vm: Vm | null = null;
      let pages = 0;
      for await (const r of reqs) {
        if (!vm) vm = hv.vm(r.vm);
        else if (r.vm && r.vm !== vm.name) throw invalidArgument(`write memory: stream started on VM ${vm.name} and then named ${r.vm}`);
        if (!r.chunk) throw invalidArgument("write memory: a message has no chunk");
        const n = writeMemory(vm, {
          slot: r.chunk.slot,
          firstPage: num(r.chunk.firstPage, "first_page"),
          numPages: r.chunk.numPages,
          bitmap: r.chunk.bitmap,
          contents: r.chunk.contents,
        }, num(r.chunk.arriveAtNs, "arrive_at_ns"));
        metrics.memoryCopiedPages.inc({ vm: vm.name, direction: "write" }, n);
        pages += n;
      }
      return { pagesWritten: BigInt(pages) };
    },
    async getMemoryDigest(req) {
      const d = await digest(hv.vm(req.vm), yieldToEventLoop, req.atResume);
      return { sha256: d.sha256, sha256Hex: d.sha256.toString("hex"), pages: BigInt(d.pages) };
    },
  };
}
