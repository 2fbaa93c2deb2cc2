/**
 * The hypervisor with its VMs in worker threads (HYPERVISOR_VM_WORKERS): the
 * gRPC thread only routes. Each VM lives in one worker (shard.ts), chosen
 * when it is created (the worker with the fewest VMs); a call naming a VM
 * goes to its worker as the bytes the client sent and comes back as the
 * bytes the client gets, so guest work, decoding and encoding use every
 * core, and two VMs' calls no longer wait for each other. ListVms gathers
 * from every worker; the page-tracking device registers in the first worker
 * (which checks it and names the link) and the others adopt that link, so
 * that the device sees one hypervisor.
 */
import { Worker } from "node:worker_threads";
import { AggregatorRegistry, Registry } from "prom-client";
import { createComponentServer, type ComponentServer } from "../../common/component.js";
import { DomainError } from "../../common/errors.js";
import { addService, MAX_MESSAGE_BYTES, type CallContext } from "../../common/grpc.js";
import type { Logger } from "../../common/log.js";
import { INSECURE, type Security } from "../../common/security.js";
import { HypervisorServiceService, ListVmsResponse, RegisterPageTrackingDeviceRequest, RegisterPageTrackingDeviceResponse } from "../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import type { CostModel } from "./model/cost-model.js";
import { HYPERVISOR_PROTO, HYPERVISOR_SERVICE, type HypervisorServer } from "./server.js";
import { bufferOf, SharedBudgetLedger, transferable, type FromShard, type ShardInit, type ToShard } from "./shard.js";

/** Client-stream messages the router hands a worker before the worker has taken them. */
const INBOX_MESSAGES = 8;

/**
 * Where a worker starts: tsx's loader is registered in each worker thread
 * (Node 20 does not carry --import's hooks into workers), then shard.ts.
 */
const BOOT = `import { register } from ${JSON.stringify(import.meta.resolve("tsx/esm/api"))}; register(); await import(${JSON.stringify(new URL("./shard.ts", import.meta.url).href)});`;

/** The string field 1 of a request (every VM-scoped request's `vm`), read off the wire without decoding the rest. */
export function vmField(frame: Buffer): string {
  let pos = 0;
  const varint = () => {
    let n = 0;
    let shift = 1;
    for (;;) {
      if (pos >= frame.length) throw new DomainError("invalid-argument", "cannot decode the request: it ends inside a field");
      const b = frame[pos++];
      n += (b & 0x7f) * shift;
      if (b < 0x80) return n;
      shift *= 128;
    }
  };
  while (pos < frame.length) {
    const tag = varint();
    const field = Math.floor(tag / 8);
    const wire = tag & 7;
    if (wire === 0) varint();
    else if (wire === 1) pos += 8;
    else if (wire === 5) pos += 4;
    else if (wire === 2) {
      const len = varint();
      if (field === 1) return frame.toString("utf8", pos, pos + len);
      pos += len;
    } else throw new DomainError("invalid-argument", `cannot decode the request: wire type ${wire}`);
  }
  return "";
}

interface Pending {
  /** A frame (or none: a stream's end), or the worker's metrics. */
  resolve(result: unknown): void;
  reject(err: unknown): void;
  /** Server streams: each message as it comes. */
  data?(frame: Buffer): void;
  /** Client streams: the worker took a message. */
  taken?(): void;
}

/** One worker and the calls in flight on it. */
class Shard {
  readonly worker: Worker;
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  /** Why the worker is gone, once it is: its VMs went with it. */
  dead: string | null = null;
  /** Stopped on purpose: its exit is not a loss. */
  stopping = false;
  vms = 0;

  constructor(
    readonly index: number,
    init: ShardInit,
    private readonly logger: Logger,
  ) {
    this.worker = new Worker(new URL(`data:text/javascript,${encodeURIComponent(BOOT)}`), { workerData: { shard: init }, execArgv: [] });
    this.worker.on("message", (m: FromShard) => this.receive(m));
    this.worker.on("error", (err) => this.die(`it failed: ${err.message}`));
    this.worker.on("exit", (code) => this.die(`it exited with code ${code}`));
  }

  private die(why: string) {
    if (this.dead) return;
    this.dead = why;
    if (!this.stopping) this.logger.error({ worker: this.index, why }, "VM worker lost; its VMs are gone");
    for (const p of this.pending.values()) p.reject(this.lost());
    this.pending.clear();
  }

  private lost(): DomainError {
    return new DomainError("unavailable", `VM worker ${this.index} of this hypervisor is gone (${this.dead}); its VMs are lost`);
  }

  private receive(m: FromShard) {
    const p = this.pending.get(m.id);
    if (!p) return;
    if (m.t === "data") return p.data?.(bufferOf(m.frame));
    if (m.t === "taken") return p.taken?.();
    this.pending.delete(m.id);
    if (m.t === "ok") p.resolve(m.frame ? bufferOf(m.frame) : null);
    else if (m.t === "error") p.reject({ code: m.code, details: m.details });
    else if (m.t === "metrics") p.resolve(m.json);
  }

  send(m: ToShard, transfer: ArrayBuffer[] = []) {
    if (!this.dead) this.worker.postMessage(m, transfer);
  }

  /** A request of the given shape; its id, and a promise of its result (a frame, unless it asks for metrics). */
  start<T = Buffer | null>(make: (id: number) => ToShard, handlers: Omit<Pending, "resolve" | "reject"> = {}, transfer: ArrayBuffer[] = []): { id: number; done: Promise<T> } {
    const id = this.nextId++;
    const done = new Promise<T>((resolve, reject) => {
      if (this.dead) return reject(this.lost());
      this.pending.set(id, { resolve: (r) => resolve(r as T), reject, ...handlers });
      this.send(make(id), transfer);
    });
    return { id, done };
  }

  /** A unary call, cancelled with signal. */
  async unary(key: string, frame: Buffer, ctx: CallContext): Promise<Buffer> {
    const t = transferable(frame);
    const { id, done } = this.start((id) => ({ t: "call", id, key, frame: t.frame, peer: ctx.peer }), {}, t.transfer);
    const cancel = () => this.send({ t: "cancel", id });
    ctx.signal.addEventListener("abort", cancel, { once: true });
    try {
      return (await done) ?? Buffer.alloc(0);
    } finally {
      ctx.signal.removeEventListener("abort", cancel);
    }
  }

  /** A server stream: the worker's messages, each acknowledged once the gRPC side has taken it. */
  async *serverStream(key: string, frame: Buffer, ctx: CallContext): AsyncIterable<Buffer> {
    const queue: Buffer[] = [];
    let wake: (() => void) | null = null;
    let finished = false;
    const t = transferable(frame);
    const { id, done } = this.start(
      (id) => ({ t: "call", id, key, frame: t.frame, peer: ctx.peer }),
      {
        data: (f) => {
          queue.push(f);
          wake?.();
        },
      },
      t.transfer,
    );
    let failure: unknown = null;
    done.then(
      () => (finished = true),
      (err) => ((failure = err), (finished = true)),
    ).finally(() => wake?.());
    const cancel = () => {
      this.send({ t: "cancel", id });
      wake?.();
    };
    ctx.signal.addEventListener("abort", cancel, { once: true });
    try {
      for (;;) {
        if (queue.length) {
          const f = queue.shift()!;
          yield f;
          this.send({ t: "ack", id, bytes: f.byteLength });
        } else if (failure) throw failure;
        else if (finished || ctx.signal.aborted) return;
        else await new Promise<void>((r) => (wake = r));
        wake = null;
      }
    } finally {
      ctx.signal.removeEventListener("abort", cancel);
      if (!finished) this.send({ t: "cancel", id });
    }
  }

  /** A client stream: the messages go to the worker as it takes them (a few ahead), then its result. */
  async clientStream(key: string, first: Buffer | undefined, rest: AsyncIterator<Buffer>, ctx: CallContext): Promise<Buffer> {
    let ahead = 0;
    let taken: (() => void) | null = null;
    const { id, done } = this.start((id) => ({ t: "open", id, key, peer: ctx.peer }), {
      taken: () => {
        ahead--;
        taken?.();
      },
    });
    const cancel = () => this.send({ t: "cancel", id });
    ctx.signal.addEventListener("abort", cancel, { once: true });
    let settled = false;
    done.catch(() => undefined).finally(() => ((settled = true), taken?.()));
    try {
      let frame = first;
      while (frame && !settled) {
        const t = transferable(frame);
        this.send({ t: "msg", id, frame: t.frame }, t.transfer);
        ahead++;
        while (ahead >= INBOX_MESSAGES && !settled) await new Promise<void>((r) => (taken = r));
        taken = null;
        const next = await rest.next();
        frame = next.done ? undefined : next.value;
      }
      this.send({ t: "end", id });
    } catch (err) {
      cancel();
      await done.catch(() => undefined);
      throw err;
    } finally {
      ctx.signal.removeEventListener("abort", cancel);
    }
    return (await done) ?? Buffer.alloc(0);
  }
}

export interface ShardedHypervisorDeps {
  workers: number;
  memoryBudgetBytes: number;
  costs: CostModel;
  allowFaultInjection: boolean;
  logger: Logger;
  registry?: Registry;
  security?: Security;
  /** Real-time drive tick of each worker; 0 disables it. */
  realtimeTickMs?: number;
  maxMessageBytes?: number;
  logLevel?: string;
}

/** The same service as createHypervisorServer's, its VMs spread over worker threads. */
export function createShardedHypervisorServer(deps: ShardedHypervisorDeps): HypervisorServer & { readonly shards: { index: number; vms: number; worker: Worker }[] } {
  const security = deps.security ?? INSECURE;
  const ledger = new SharedArrayBuffer(SharedBudgetLedger.bytesFor(deps.workers));
  const shards = Array.from({ length: deps.workers }, (_, index) =>
    new Shard(index, {
      index,
      count: deps.workers,
      memoryBudgetBytes: deps.memoryBudgetBytes,
      costs: deps.costs,
      allowFaultInjection: deps.allowFaultInjection,
      ledger,
      security,
      maxMessageBytes: deps.maxMessageBytes ?? MAX_MESSAGE_BYTES,
      realtimeTickMs: deps.realtimeTickMs ?? 20,
      logLevel: deps.logLevel ?? process.env.LOG_LEVEL ?? "info",
    }, deps.logger),
  );
  /** Each VM's worker, from the moment its CreateVm is sent. */
  const home = new Map<string, Shard>();
  const shardOf = (frame: Buffer) => home.get(vmField(frame)) ?? shards[0];
  const live = () => shards.filter((s) => !s.dead);

  const app: ComponentServer = createComponentServer({
    registry: deps.registry,
    security,
    protoFiles: [HYPERVISOR_PROTO],
    serviceNames: [HYPERVISOR_SERVICE],
    health: () => {
      const dead = shards.filter((s) => s.dead);
      return { ok: dead.length === 0, detail: { vms: home.size, workers: shards.length, ...(dead.length ? { lost: dead.map((s) => `worker ${s.index}: ${s.dead}`) } : {}) } };
    },
    metrics: async () => {
      const json = await Promise.all(live().map((s) => s.start<Parameters<typeof AggregatorRegistry.aggregate>[0][number]>((id) => ({ t: "metrics", id })).done));
      return Registry.merge([app.registry, AggregatorRegistry.aggregate(json)]).metrics();
    },
    onClose: async () => {
      for (const s of shards) s.stopping = true;
      await Promise.all(live().map((s) => s.start((id) => ({ t: "stop", id })).done.catch(() => undefined)));
      await Promise.all(shards.map((s) => s.worker.terminate()));
    },
  });

  const routed = (key: string) => {
    const m = HypervisorServiceService[key as keyof typeof HypervisorServiceService];
    if (m.requestStream) return (reqs: AsyncIterable<Buffer>, ctx: CallContext) => firstThen(reqs, (first, rest) => (first ? shardOf(first) : shards[0]).clientStream(key, first, rest, ctx));
    if (m.responseStream) return (frame: Buffer, ctx: CallContext) => shardOf(frame).serverStream(key, frame, ctx);
    return (frame: Buffer, ctx: CallContext) => shardOf(frame).unary(key, frame, ctx);
  };
  const handlers: Record<string, unknown> = Object.fromEntries(Object.keys(HypervisorServiceService).map((k) => [k, routed(k)]));

  handlers.createVm = async (frame: Buffer, ctx: CallContext) => {
    const name = vmField(frame);
    const known = home.get(name);
    // A name already placed goes where it is (its worker refuses it as the model does); a new one to the emptiest worker.
    const shard = known ?? live().reduce((a, b) => (b.vms < a.vms ? b : a), live()[0] ?? shards[0]);
    if (!known && name) {
      home.set(name, shard);
      shard.vms++;
    }
    try {
      return await shard.unary("createVm", frame, ctx);
    } catch (err) {
      if (!known && name) {
        home.delete(name);
        shard.vms--;
      }
      throw err;
    }
  };
  handlers.destroyVm = async (frame: Buffer, ctx: CallContext) => {
    const name = vmField(frame);
    const shard = shardOf(frame);
    const out = await shard.unary("destroyVm", frame, ctx);
    if (home.get(name) === shard) {
      home.delete(name);
      shard.vms--;
    }
    return out;
  };
  // A call sent to several workers gets a copy for each: a frame may be transferred, which empties it here.
  handlers.listVms = async (frame: Buffer, ctx: CallContext) => {
    const parts = await Promise.all(live().map((s) => s.unary("listVms", Buffer.from(frame), ctx)));
    const vms = parts.flatMap((p) => ListVmsResponse.decode(p).vms).sort((a, b) => a.vmid - b.vmid);
    return bufferOf(ListVmsResponse.encode({ vms }).finish());
  };
  handlers.registerPageTrackingDevice = async (frame: Buffer, ctx: CallContext) => {
    const { address } = RegisterPageTrackingDeviceRequest.decode(frame);
    const out = await shards[0].unary("registerPageTrackingDevice", frame, ctx);
    const { linkId } = RegisterPageTrackingDeviceResponse.decode(out);
    await Promise.all(shards.slice(1).filter((s) => !s.dead).map((s) => s.start((id) => ({ t: "adopt", id, address, link: linkId })).done));
    return out;
  };
  handlers.unregisterPageTrackingDevice = async (frame: Buffer, ctx: CallContext) => {
    const [first, ...others] = shards;
    await Promise.all(others.filter((s) => !s.dead).map((s) => s.unary("unregisterPageTrackingDevice", Buffer.from(frame), ctx).catch(() => undefined)));
    return first.unary("unregisterPageTrackingDevice", frame, ctx);
  };

  addService(app.grpc, HypervisorServiceService, handlers as never, { metrics: app.rpcMetrics, logger: deps.logger, raw: true });
  return Object.defineProperty(app, "shards", { get: () => shards.map((s) => ({ index: s.index, vms: s.vms, worker: s.worker })) }) as HypervisorServer & {
    readonly shards: { index: number; vms: number; worker: Worker }[];
  };
}

/** A stream's first message (none if it is empty) and an iterator over the rest: a client stream is routed by its first message. */
async function firstThen<T>(reqs: AsyncIterable<Buffer>, then: (first: Buffer | undefined, rest: AsyncIterator<Buffer>) => Promise<T>): Promise<T> {
  const it = reqs[Symbol.asyncIterator]();
  const first = await it.next();
  return then(first.done ? undefined : first.value, it);
}
