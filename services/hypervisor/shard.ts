/**
 * One VM worker (a shard of the hypervisor, see shards.ts): a worker thread
 * with its own model, the service's own handlers over it, its metrics
 * registry, its link to the page-tracking device and its real-time drive. It
 * takes requests as the bytes the client sent and answers with the bytes the
 * client gets, so that decoding, guest work and encoding all run off the
 * gRPC thread; a VM lives in exactly one worker, and that worker runs its
 * calls in the order they come, so a VM behaves as on a single thread.
 */
import { parentPort, workerData } from "node:worker_threads";
import { status } from "@grpc/grpc-js";
import { Registry } from "prom-client";
import { DomainError } from "../../common/errors.js";
import { MAX_UNSENT_STREAM_BYTES, responseSerializers, toStatus, type CallContext } from "../../common/grpc.js";
import { createLogger } from "../../common/log.js";
import * as messages from "../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { HypervisorServiceService } from "../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { SLICE_MS } from "./api/vms.js";
import type { CostModel } from "./model/cost-model.js";
import { RealtimeDriver } from "./model/clock.js";
import { Hypervisor, type BudgetLedger } from "./model/hypervisor.js";
import { createHypervisorApi } from "./server.js";
import { serverSerializers } from "./wire.js";

export interface ShardInit {
  index: number;
  count: number;
  memoryBudgetBytes: number;
  costs: CostModel;
  allowFaultInjection: boolean;
  /** The budget ledger's memory (SharedBudgetLedger.bytesFor(count)). */
  ledger: SharedArrayBuffer;
  security: { cert: Uint8Array | null; key: Uint8Array | null; ca: Uint8Array | null; token: string | null };
  maxMessageBytes: number;
  realtimeTickMs: number;
  logLevel: string;
}

/** From the router. A call's id names it in every later message about it. */
export type ToShard =
  | { t: "call"; id: number; key: string; frame: Uint8Array; peer: string }
  | { t: "open"; id: number; key: string; peer: string }
  | { t: "msg"; id: number; frame: Uint8Array }
  | { t: "end"; id: number }
  | { t: "cancel"; id: number }
  | { t: "ack"; id: number; bytes: number }
  | { t: "adopt"; id: number; address: string; link: string }
  | { t: "metrics"; id: number }
  | { t: "stop"; id: number };

/** To the router: a result (or a stream's end), a streamed message, a status, a client-stream message taken. */
export type FromShard =
  | { t: "ok"; id: number; frame: Uint8Array | null }
  | { t: "data"; id: number; frame: Uint8Array }
  | { t: "error"; id: number; code: number; details: string }
  | { t: "taken"; id: number }
  | { t: "metrics"; id: number; json: unknown };

/**
 * Bytes in use per worker in shared memory, behind a lock word, so that a
 * check against the process's budget and the reservation it makes are one
 * step for all workers. (Atomics.wait blocks: workers only.)
 */
export class SharedBudgetLedger implements BudgetLedger {
  private readonly lock: Int32Array;
  private readonly used: Float64Array;
  static bytesFor(count: number): number {
    return 8 + 8 * count;
  }
  constructor(
    memory: SharedArrayBuffer,
    private readonly index: number,
  ) {
    this.lock = new Int32Array(memory, 0, 1);
    this.used = new Float64Array(memory, 8, (memory.byteLength - 8) / 8);
  }
  locked<T>(fn: () => T): T {
    while (Atomics.compareExchange(this.lock, 0, 0, 1) !== 0) Atomics.wait(this.lock, 0, 1);
    try {
      return fn();
    } finally {
      Atomics.store(this.lock, 0, 0);
      Atomics.notify(this.lock, 0, 1);
    }
  }
  others(): number {
    let n = 0;
    for (let i = 0; i < this.used.length; i++) if (i !== this.index) n += this.used[i];
    return n;
  }
  publish(bytes: number): void {
    this.used[this.index] = bytes;
  }
}

/** A Buffer over a view's bytes, without a copy. */
export const bufferOf = (u: Uint8Array) => Buffer.from(u.buffer, u.byteOffset, u.byteLength);

/**
 * Bytes of a frame's memory that may lie outside it for the memory to be the
 * frame's alone: grpc-js reads a large message into one allocation behind
 * its 5-byte header (a smaller one shares a chunk or Buffer's pool).
 */
const GRPC_HEADER_BYTES = 5;

/** Transferred when the frame's memory holds nothing else (a large message), copied when it shares a chunk or a pool. */
export function transferable(frame: Uint8Array): { frame: Uint8Array; transfer: ArrayBuffer[] } {
  const own = frame.buffer.byteLength - frame.byteLength <= GRPC_HEADER_BYTES && !(frame.buffer instanceof SharedArrayBuffer);
  return own ? { frame, transfer: [frame.buffer as ArrayBuffer] } : { frame: new Uint8Array(frame), transfer: [] };
}

type Method = (typeof HypervisorServiceService)[keyof typeof HypervisorServiceService];
type AnyHandler = (arg: unknown, ctx: CallContext) => unknown;

function runShard(init: ShardInit): void {
  const port = parentPort!;
  const post = (m: FromShard, transfer: ArrayBuffer[] = []) => port.postMessage(m, transfer);
  const logger = createLogger("hypervisor", init.logLevel).child({ worker: init.index });
  const ledger = new SharedBudgetLedger(init.ledger, init.index);
  const hypervisor = new Hypervisor({
    memoryBudgetBytes: init.memoryBudgetBytes,
    costs: init.costs,
    allowFaultInjection: init.allowFaultInjection,
    shard: { firstVmid: init.index + 1, vmidStride: init.count, ledger },
  });
  const registry = new Registry();
  const pem = (u: Uint8Array | null) => (u ? bufferOf(u) : null);
  const security = { cert: pem(init.security.cert), key: pem(init.security.key), ca: pem(init.security.ca), token: init.security.token };
  const api = createHypervisorApi({ hypervisor, logger, registry, security, maxMessageBytes: init.maxMessageBytes });
  const handlers = api.handlers as unknown as Record<string, AnyHandler>;
  const methods = HypervisorServiceService as unknown as Record<string, Method>;
  const serialize = responseSerializers(methods, { messages, serializers: serverSerializers });
  const driver = new RealtimeDriver(() => hypervisor.vms.values(), init.realtimeTickMs, SLICE_MS);
  if (init.realtimeTickMs !== 0) driver.start();

  interface Call {
    abort: AbortController;
    /** Server streams: bytes posted and not yet acknowledged, and who waits for an acknowledgement. */
    unacked: number;
    acked: (() => void) | null;
    /** Client streams: messages not yet taken, and who waits for one. */
    inbox: Buffer[];
    ended: boolean;
    arrived: (() => void) | null;
  }
  const calls = new Map<number, Call>();
  const fail = (id: number, err: unknown) => {
    const s = toStatus(err);
    if (s.code === status.INTERNAL) logger.error({ err }, "RPC failed with an internal error");
    post({ t: "error", id, ...s });
  };

  async function* inbound(call: Call, decode: (b: Buffer) => unknown, id: number): AsyncIterable<unknown> {
    for (;;) {
      if (call.inbox.length) {
        const frame = call.inbox.shift()!;
        post({ t: "taken", id });
        yield decode(frame);
      } else if (call.ended) return;
      else if (call.abort.signal.aborted) throw new DomainError("aborted", "the client cancelled the stream");
      else await new Promise<void>((r) => (call.arrived = r));
    }
  }

  async function run(id: number, key: string, arg: unknown, peer: string, call: Call) {
    const m = methods[key];
    const ctx: CallContext = { signal: call.abort.signal, peer };
    try {
      const out = handlers[key](arg, ctx);
      if (!m.responseStream) {
        const { frame, transfer } = transferable(serialize[key](await out));
        post({ t: "ok", id, frame }, transfer);
        return;
      }
      for await (const msg of out as AsyncIterable<unknown>) {
        if (call.abort.signal.aborted) break;
        // As the server's bounded writer does: at most this much unacknowledged, one message always may go.
        while (call.unacked >= MAX_UNSENT_STREAM_BYTES && !call.abort.signal.aborted) await new Promise<void>((r) => (call.acked = r));
        const { frame, transfer } = transferable(serialize[key](msg));
        call.unacked += frame.byteLength;
        post({ t: "data", id, frame }, transfer);
      }
      post({ t: "ok", id, frame: null });
    } catch (err) {
      fail(id, err);
    } finally {
      calls.delete(id);
      ledger.locked(() => ledger.publish(hypervisor.memoryInUse));
    }
  }

  const newCall = (id: number): Call => {
    const call: Call = { abort: new AbortController(), unacked: 0, acked: null, inbox: [], ended: false, arrived: null };
    calls.set(id, call);
    return call;
  };
  const wake = (call: Call | undefined) => {
    const w = call?.arrived;
    if (call) call.arrived = null;
    w?.();
  };

  port.on("message", (msg: ToShard) => {
    switch (msg.t) {
      case "call": {
        let req: unknown;
        try {
          req = methods[msg.key].requestDeserialize(bufferOf(msg.frame));
        } catch (err) {
          fail(msg.id, new DomainError("invalid-argument", `cannot decode the request: ${(err as Error).message}`));
          return;
        }
        void run(msg.id, msg.key, req, msg.peer, newCall(msg.id));
        return;
      }
      case "open": {
        const call = newCall(msg.id);
        void run(msg.id, msg.key, inbound(call, (b) => methods[msg.key].requestDeserialize(b), msg.id), msg.peer, call);
        return;
      }
      case "msg": {
        const call = calls.get(msg.id);
        call?.inbox.push(bufferOf(msg.frame));
        wake(call);
        return;
      }
      case "end": {
        const call = calls.get(msg.id);
        if (call) call.ended = true;
        wake(call);
        return;
      }
      case "cancel": {
        const call = calls.get(msg.id);
        call?.abort.abort();
        wake(call);
        const w = call?.acked;
        if (call) call.acked = null;
        w?.();
        return;
      }
      case "ack": {
        const call = calls.get(msg.id);
        if (!call) return;
        call.unacked -= msg.bytes;
        const w = call.acked;
        call.acked = null;
        w?.();
        return;
      }
      case "adopt":
        try {
          post({ t: "ok", id: msg.id, frame: new TextEncoder().encode(api.devices.adopt(msg.address, msg.link)) });
        } catch (err) {
          fail(msg.id, err);
        }
        return;
      case "metrics":
        void registry.getMetricsAsJSON().then(
          (json) => post({ t: "metrics", id: msg.id, json }),
          (err) => fail(msg.id, err),
        );
        return;
      case "stop":
        driver.stop();
        void (api.devices.link ? api.devices.unregister(api.devices.link.address) : Promise.resolve())
          .catch(() => undefined)
          .then(() => post({ t: "ok", id: msg.id, frame: null }));
        return;
    }
  });
}

if (parentPort && (workerData as { shard?: ShardInit } | undefined)?.shard) runShard((workerData as { shard: ShardInit }).shard);
