/**
 * gRPC plumbing shared by every server: binds plain async handlers to a
 * ts-proto service definition, maps domain errors to status codes at this one
 * boundary, records go-grpc-prometheus RPC metrics, and adds the standard
 * health and reflection services.
 */
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { ReflectionService } from "@grpc/reflection";
import { HealthImplementation } from "grpc-health-check";
import { Counter, Histogram, type Registry } from "prom-client";
import { DomainError, type ErrorKind } from "./errors.js";
import type { Logger } from "./log.js";
import { withProtocMapEntries } from "./reflection.js";

const STATUS_OF: Record<ErrorKind, grpc.status> = {
  "invalid-argument": grpc.status.INVALID_ARGUMENT,
  "not-found": grpc.status.NOT_FOUND,
  "already-exists": grpc.status.ALREADY_EXISTS,
  "failed-precondition": grpc.status.FAILED_PRECONDITION,
  "resource-exhausted": grpc.status.RESOURCE_EXHAUSTED,
  "permission-denied": grpc.status.PERMISSION_DENIED,
  unimplemented: grpc.status.UNIMPLEMENTED,
  unavailable: grpc.status.UNAVAILABLE,
  aborted: grpc.status.ABORTED,
  unauthenticated: grpc.status.UNAUTHENTICATED,
  internal: grpc.status.INTERNAL,
};

/** A status received from another server, as the kind of error this server answers with. */
export function kindOfStatus(code: grpc.status): ErrorKind {
  const found = (Object.entries(STATUS_OF) as [ErrorKind, grpc.status][]).find(([, c]) => c === code);
  return found ? found[0] : "internal";
}

/**
 * Status details travel in a header; clients refuse headers past 8 KiB by
 * default, so a message that echoes a huge input must not get near that.
 */
export const MAX_DETAILS_CHARS = 1024;

function bounded(details: string): string {
  return details.length <= MAX_DETAILS_CHARS ? details : `${details.slice(0, MAX_DETAILS_CHARS - 30)}… (${details.length} characters)`;
}

/** The one place where errors become gRPC statuses. */
export function toStatus(err: unknown): { code: grpc.status; details: string } {
  if (err instanceof DomainError) return { code: STATUS_OF[err.kind], details: bounded(err.message) };
  const e = err as Partial<grpc.ServiceError>;
  if (typeof e?.code === "number" && typeof e.details === "string") return { code: e.code, details: bounded(e.details) };
  return { code: grpc.status.INTERNAL, details: bounded(`internal error: ${(err as Error)?.message ?? String(err)}`) };
}

type MethodDef = {
  path: string;
  requestStream: boolean;
  responseStream: boolean;
  requestDeserialize: (b: Buffer) => unknown;
  responseSerialize: (v: never) => Buffer;
};
type ReqOf<M> = M extends { requestDeserialize: (b: Buffer) => infer R } ? R : never;
type ResOf<M> = M extends { responseSerialize: (v: infer R) => Buffer } ? R : never;

export interface CallContext {
  /** Aborted when the client cancels or the deadline passes. */
  signal: AbortSignal;
  peer: string;
}

/** What a service implementation provides, derived from the generated definition. */
export type ServiceHandlers<D> = {
  [K in keyof D]: D[K] extends { requestStream: false; responseStream: false }
    ? (req: ReqOf<D[K]>, ctx: CallContext) => Promise<ResOf<D[K]>> | ResOf<D[K]>
    : D[K] extends { requestStream: false; responseStream: true }
      ? (req: ReqOf<D[K]>, ctx: CallContext) => AsyncIterable<ResOf<D[K]>> | Iterable<ResOf<D[K]>>
      : D[K] extends { requestStream: true; responseStream: false }
        ? (reqs: AsyncIterable<ReqOf<D[K]>>, ctx: CallContext) => Promise<ResOf<D[K]>>
        : (reqs: AsyncIterable<ReqOf<D[K]>>, ctx: CallContext) => AsyncIterable<ResOf<D[K]>>;
};

/** go-grpc-prometheus's server families. */
export class GrpcServerMetrics {
  readonly started: Counter<string>;
  readonly handled: Counter<string>;
  readonly handlingSeconds: Histogram<string>;
  readonly msgReceived: Counter<string>;
  readonly msgSent: Counter<string>;

  constructor(registry: Registry) {
    const labelNames = ["grpc_type", "grpc_service", "grpc_method"];
    this.started = new Counter({
      name: "grpc_server_started_total",
      help: "Total number of RPCs started on the server.",
      labelNames,
      registers: [registry],
    });
    this.handled = new Counter({
      name: "grpc_server_handled_total",
      help: "Total number of RPCs completed on the server, regardless of success or failure.",
      labelNames: [...labelNames, "grpc_code"],
      registers: [registry],
    });
    this.handlingSeconds = new Histogram({
      name: "grpc_server_handling_seconds",
      help: "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
      labelNames,
      buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
      registers: [registry],
    });
    this.msgReceived = new Counter({
      name: "grpc_server_msg_received_total",
      help: "Total number of RPC stream messages received on the server.",
      labelNames,
      registers: [registry],
    });
    this.msgSent = new Counter({
      name: "grpc_server_msg_sent_total",
      help: "Total number of gRPC stream messages sent by the server.",
      labelNames,
      registers: [registry],
    });
  }
}

const GRPC_TYPE = (m: MethodDef) =>
  m.requestStream ? (m.responseStream ? "bidi_stream" : "client_stream") : m.responseStream ? "server_stream" : "unary";

function contextOf(call: { cancelled: boolean; once(ev: "cancelled", fn: () => void): unknown; getPeer(): string }): CallContext {
  const ac = new AbortController();
  if (call.cancelled) ac.abort();
  else call.once("cancelled", () => ac.abort());
  return { signal: ac.signal, peer: call.getPeer() };
}

/**
 * The messages of a server-side request stream, from its 'data'/'end'/'error'
 * events. (A grpc-js duplex's own async iterator never ends when the client
 * half-closes while the server is still writing.)
 */
function messages<T>(stream: NodeJS.EventEmitter & { pause(): void; resume(): void }, onMessage: () => void): AsyncIterable<T> {
  const queue: T[] = [];
  let ended = false;
  let failure: unknown = null;
  let wake: (() => void) | null = null;
  const notify = () => {
    const w = wake;
    wake = null;
    w?.();
  };
  stream.on("data", (m: T) => {
    queue.push(m);
    if (queue.length >= 64) stream.pause();
    notify();
  });
  stream.on("end", () => {
    ended = true;
    notify();
  });
  stream.on("error", (e: unknown) => {
    failure = e;
    notify();
  });
  return {
    async *[Symbol.asyncIterator]() {
      for (;;) {
        if (queue.length) {
          const m = queue.shift()!;
          if (queue.length < 16) stream.resume();
          onMessage();
          yield m;
        } else if (failure) throw failure;
        else if (ended) return;
        else await new Promise<void>((r) => (wake = r));
      }
    },
  };
}

/**
 * Bytes a server stream may have handed to grpc-js that HTTP/2 has not yet
 * sent (their write callbacks have not fired; at least one message always
 * goes). A client that stops reading stops the handler there, instead of the
 * server buffering what it produces: 40 unread ReadMemory streams of 8 MiB
 * messages held 128 MiB each with grpc-js's own limit of 16 messages.
 */
export const MAX_UNSENT_STREAM_BYTES = 4 * 1024 * 1024;

/** Waits until what is unsent is under the bound (one message always may go), then serializes the message and writes it. */
function boundedWriter(call: { write(m: unknown, cb: () => void): boolean }, signal: AbortSignal, serialize: (v: never) => Buffer) {
  const unsent: { bytes: number; sent: Promise<void> }[] = [];
  let bytes = 0;
  const aborted = new Promise<void>((resolve) => (signal.aborted ? resolve() : signal.addEventListener("abort", () => resolve(), { once: true })));
  return async (msg: unknown) => {
    while (unsent.length > 0 && bytes >= MAX_UNSENT_STREAM_BYTES && !signal.aborted) {
      const oldest = unsent.shift()!;
      await Promise.race([oldest.sent, aborted]);
      bytes -= oldest.bytes;
    }
    const frame = serialize(msg as never);
    unsent.push({ bytes: frame.byteLength, sent: new Promise<void>((resolve) => call.write(frame, () => resolve())) });
    bytes += frame.byteLength;
  };
}

/** A generated module's namespace: each message type by name, with its encode(). */
export type Messages = Record<string, unknown>;

export interface SerializerOptions {
  messages?: Messages;
  serializers?: Record<string, (v: unknown) => Buffer>;
}

/**
 * Each method's response encoder, by method key: with the generated module's
 * messages (buf's STANDARD lint names each method's response
 * <Method>Response), responses are encoded into a Buffer that views the
 * encoder's output instead of copying it, as the generated serializer does;
 * serializers replace the encoding of some (by method key) outright.
 */
export function responseSerializers(definition: Record<string, MethodDef>, opts: SerializerOptions): Record<string, (v: unknown) => Buffer> {
  return Object.fromEntries(
    Object.entries(definition).map(([k, m]) => {
      const [, , method] = /^\/(.+)\/([^/]+)$/.exec(m.path)!;
      const type = opts.messages?.[`${method}Response`] as { encode(v: unknown): { finish(): Uint8Array } } | undefined;
      const serialize =
        opts.serializers?.[k] ??
        (type
          ? (v: unknown) => {
              const u = type.encode(v).finish();
              return Buffer.from(u.buffer, u.byteOffset, u.byteLength);
            }
          : (m.responseSerialize as (v: unknown) => Buffer));
      return [k, serialize];
    }),
  );
}

/**
 * Adds a service to a server: the handlers become grpc-js handlers through
 * bindService, and streamed responses reach grpc-js already serialized (so
 * that the writer knows their size without encoding them twice), by
 * responseSerializers. With raw, requests reach the handlers undecoded and
 * responses are Buffers the handlers encoded (a router in front of workers).
 */
export function addService<D extends Record<string, MethodDef>>(
  server: grpc.Server,
  definition: D,
  handlers: ServiceHandlers<D>,
  opts: { metrics?: GrpcServerMetrics; logger?: Logger; raw?: boolean } & SerializerOptions = {},
): void {
  const identity = (b: Buffer) => b;
  const serialize = responseSerializers(definition, opts);
  const defs = Object.fromEntries(
    Object.entries(definition).map(([k, m]) => [
      k,
      opts.raw ? { ...m, requestDeserialize: identity, responseSerialize: identity } : { ...m, responseSerialize: serialize[k] },
    ]),
  ) as unknown as D;
  const wire = Object.fromEntries(
    Object.entries(defs).map(([k, m]) => [k, m.responseStream ? { ...m, responseSerialize: identity } : m]),
  );
  server.addService(wire as unknown as grpc.ServiceDefinition, bindService(defs, handlers, opts));
}

/**
 * Turns plain handlers into grpc-js handlers: errors thrown anywhere become a
 * precise status (never a crash), and every call is counted and timed.
 * Streamed responses are written serialized (see addService).
 */
function bindService<D extends Record<string, MethodDef>>(
  definition: D,
  handlers: ServiceHandlers<D>,
  opts: { metrics?: GrpcServerMetrics; logger?: Logger } = {},
): grpc.UntypedServiceImplementation {
  const out: grpc.UntypedServiceImplementation = {};
  for (const key of Object.keys(definition)) {
    const m = definition[key];
    const [, service, method] = /^\/(.+)\/([^/]+)$/.exec(m.path)!;
    const labels = { grpc_type: GRPC_TYPE(m), grpc_service: service, grpc_method: method };
    const metrics = opts.metrics;
    const fn = handlers[key as keyof D] as unknown as (a: unknown, ctx: CallContext) => unknown;
    const finish = (startNs: bigint, code: grpc.status, err?: unknown) => {
      metrics?.handled.inc({ ...labels, grpc_code: grpc.status[code] });
      metrics?.handlingSeconds.observe(labels, Number(process.hrtime.bigint() - startNs) / 1e9);
      if (code === grpc.status.INTERNAL) opts.logger?.error({ err, method: m.path }, "RPC failed with an internal error");
    };
    const fail = (startNs: bigint, err: unknown) => {
      const s = toStatus(err);
      finish(startNs, s.code, err);
      return { code: s.code, details: s.details, metadata: new grpc.Metadata() } as grpc.ServiceError;
    };
    if (!m.requestStream && !m.responseStream) {
      out[key] = (async (call: grpc.ServerUnaryCall<unknown, unknown>, callback: grpc.sendUnaryData<unknown>) => {
        const t0 = process.hrtime.bigint();
        metrics?.started.inc(labels);
        metrics?.msgReceived.inc(labels);
        try {
          const res = await fn(call.request, contextOf(call));
          finish(t0, grpc.status.OK);
          metrics?.msgSent.inc(labels);
          callback(null, res);
        } catch (err) {
          callback(fail(t0, err));
        }
      }) as grpc.handleUnaryCall<unknown, unknown>;
    } else if (!m.requestStream && m.responseStream) {
      out[key] = (async (call: grpc.ServerWritableStream<unknown, unknown>) => {
        const t0 = process.hrtime.bigint();
        metrics?.started.inc(labels);
        metrics?.msgReceived.inc(labels);
        const ctx = contextOf(call);
        const write = boundedWriter(call, ctx.signal, m.responseSerialize);
        try {
          for await (const msg of fn(call.request, ctx) as AsyncIterable<unknown>) {
            if (ctx.signal.aborted) break;
            metrics?.msgSent.inc(labels);
            await write(msg);
          }
          finish(t0, ctx.signal.aborted ? grpc.status.CANCELLED : grpc.status.OK);
          call.end();
        } catch (err) {
          // grpc-js turns an "error" event into the stream's final status.
          call.emit("error", fail(t0, err));
        }
      }) as grpc.handleServerStreamingCall<unknown, unknown>;
    } else if (m.requestStream && !m.responseStream) {
      out[key] = (async (call: grpc.ServerReadableStream<unknown, unknown>, callback: grpc.sendUnaryData<unknown>) => {
        const t0 = process.hrtime.bigint();
        metrics?.started.inc(labels);
        try {
          const reqs = messages(call, () => metrics?.msgReceived.inc(labels));
          const res = await fn(reqs, contextOf(call));
          finish(t0, grpc.status.OK);
          metrics?.msgSent.inc(labels);
          callback(null, res);
        } catch (err) {
          callback(fail(t0, err));
        }
      }) as grpc.handleClientStreamingCall<unknown, unknown>;
    } else {
      out[key] = (async (call: grpc.ServerDuplexStream<unknown, unknown>) => {
        const t0 = process.hrtime.bigint();
        metrics?.started.inc(labels);
        const ctx = contextOf(call);
        const write = boundedWriter(call, ctx.signal, m.responseSerialize);
        try {
          const reqs = messages(call, () => metrics?.msgReceived.inc(labels));
          for await (const msg of fn(reqs, ctx) as AsyncIterable<unknown>) {
            metrics?.msgSent.inc(labels);
            await write(msg);
          }
          finish(t0, grpc.status.OK);
          call.end();
        } catch (err) {
          // grpc-js turns an "error" event into the stream's final status.
          call.emit("error", fail(t0, err));
        }
      }) as grpc.handleBidiStreamingCall<unknown, unknown>;
    }
  }
  return out;
}

/** Large bitmaps and page batches travel in single messages; 64 MiB leaves room for a 256 GiB slot's bitmap. */
export const MAX_MESSAGE_BYTES = 64 * 1024 * 1024;

export const channelOptions: grpc.ChannelOptions = {
  "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
  "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
  // HTTP/2's default 64 KiB window makes a 2 MiB bitmap wait for ~30 WINDOW_UPDATE round trips.
  "grpc-node.flow_control_window": 16 * 1024 * 1024,
};

/**
 * Adds grpc.health.v1 (SERVING for each named service and for "") and server
 * reflection over the project's .proto files, so grpcurl and
 * grpc_health_probe work against every server.
 */
export function addStandardServices(server: grpc.Server, protoFiles: string[], serviceNames: string[]) {
  const health = new HealthImplementation(Object.fromEntries(["", ...serviceNames].map((n) => [n, "SERVING"])));
  health.addToServer(server);
  // Reflection describes the health service too, so that `buf curl …/grpc.health.v1.Health/Check` and grpcurl find it.
  const pkg = protoLoader.loadSync([...protoFiles, "health/v1/health.proto"], { includeDirs: [PROTO_ROOT, HEALTH_PROTO_ROOT], longs: String, keepCase: true });
  new ReflectionService(withProtocMapEntries(pkg)).addToServer(server);
  return health;
}

export const PROTO_ROOT = new URL("../proto/", import.meta.url).pathname;
/** grpc-health-check's copy of grpc/health/v1/health.proto. */
const HEALTH_PROTO_ROOT = join(dirname(createRequire(import.meta.url).resolve("grpc-health-check/package.json")), "proto");

export async function bindServer(server: grpc.Server, host: string, port: number, credentials = grpc.ServerCredentials.createInsecure()): Promise<number> {
  return new Promise((resolve, reject) => {
    server.bindAsync(`${host}:${port}`, credentials, (err, bound) => (err ? reject(err) : resolve(bound)));
  });
}

export async function shutdownServer(server: grpc.Server, graceMs = 2000): Promise<void> {
  await new Promise<void>((resolve) => {
    const timer = setTimeout(() => {
      server.forceShutdown();
      resolve();
    }, graceMs);
    server.tryShutdown(() => {
      clearTimeout(timer);
      resolve();
    });
  });
}
