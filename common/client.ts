/**
 * A promise-based client for any ts-proto service definition: requests are
 * partial messages (filled with fromPartial, so callers name only the fields
 * they mean), streams are async iterables, and every call is counted in
 * go-grpc-prometheus's client families when a registry is given.
 */
import * as grpc from "@grpc/grpc-js";
import { Counter, Histogram, type Registry } from "prom-client";
import { channelOptions, type Messages } from "./grpc.js";
import { authMetadata, channelCredentials, INSECURE, type Security } from "./security.js";

type MethodDef = {
  path: string;
  requestStream: boolean;
  responseStream: boolean;
  requestSerialize: (v: never) => Buffer;
  responseDeserialize: (b: Buffer) => unknown;
};
type ReqOf<M> = M extends { requestSerialize: (v: infer R) => Buffer } ? R : never;
type ResOf<M> = M extends { responseDeserialize: (b: Buffer) => infer R } ? R : never;

type Builtin = Date | ((...args: never[]) => unknown) | Uint8Array | bigint | number | string | boolean | undefined;
export type DeepPartial<T> = T extends Builtin
  ? T
  : T extends Array<infer U>
    ? Array<DeepPartial<U>>
    : T extends object
      ? { [K in keyof T]?: DeepPartial<T[K]> }
      : Partial<T>;

export interface CallOptions {
  /** Milliseconds from now; Infinity for a stream meant to live as long as the channel. */
  deadlineMs?: number;
  signal?: AbortSignal;
}

export interface ClientOptions {
  metrics?: GrpcClientMetrics;
  security?: Security;
  /** Deadline of every call that names none (default 30 s). */
  deadlineMs?: number;
  /**
   * A peer that stops answering (SIGSTOP, a dead host) is detected within
   * about this long by HTTP/2 keepalive pings, whatever its calls' deadlines
   * (default 10 s); its calls then fail with UNAVAILABLE.
   */
  hangTimeoutMs?: number;
  /** Request serializers that replace the generated ones, by method key (the hypervisor's for guest memory). */
  serializers?: Record<string, (v: unknown) => Buffer>;
}

export const DEFAULT_DEADLINE_MS = 30_000;
export const DEFAULT_HANG_TIMEOUT_MS = 10_000;

export type PromiseClient<D> = {
  [K in keyof D]: D[K] extends { requestStream: false; responseStream: false }
    ? (req: DeepPartial<ReqOf<D[K]>>, opts?: CallOptions) => Promise<ResOf<D[K]>>
    : D[K] extends { requestStream: false; responseStream: true }
      ? (req: DeepPartial<ReqOf<D[K]>>, opts?: CallOptions) => AsyncIterable<ResOf<D[K]>>
      : D[K] extends { requestStream: true; responseStream: false }
        ? (reqs: AsyncIterable<DeepPartial<ReqOf<D[K]>>> | Iterable<DeepPartial<ReqOf<D[K]>>>, opts?: CallOptions) => Promise<ResOf<D[K]>>
        : (opts?: CallOptions) => grpc.ClientDuplexStream<DeepPartial<ReqOf<D[K]>>, ResOf<D[K]>>;
} & { close(): void; readonly address: string; waitForReady(deadlineMs: number): Promise<void> };

/** go-grpc-prometheus's client families. */
export class GrpcClientMetrics {
  readonly started: Counter<string>;
  readonly handled: Counter<string>;
  readonly handlingSeconds: Histogram<string>;
  constructor(registry: Registry) {
    const labelNames = ["grpc_type", "grpc_service", "grpc_method"];
    this.started = new Counter({ name: "grpc_client_started_total", help: "Total number of RPCs started on the client.", labelNames, registers: [registry] });
    this.handled = new Counter({
      name: "grpc_client_handled_total",
      help: "Total number of RPCs completed by the client, regardless of success or failure.",
      labelNames: [...labelNames, "grpc_code"],
      registers: [registry],
    });
    this.handlingSeconds = new Histogram({
      name: "grpc_client_handling_seconds",
      help: "Histogram of response latency (seconds) of the gRPC until it is finished by the application.",
      labelNames,
      buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
      registers: [registry],
    });
  }
}


/**
 * Cancels a call when signal aborts (at once if it already has); returns
 * what stops listening, which every call does when it ends, or a signal that
 * outlives many calls (a migration's) would collect their listeners.
 */
function onAbort(signal: AbortSignal | undefined, cancel: () => void): () => void {
  if (!signal) return () => undefined;
  if (signal.aborted) {
    queueMicrotask(cancel);
    return () => undefined;
  }
  signal.addEventListener("abort", cancel, { once: true });
  return () => signal.removeEventListener("abort", cancel);
}

/**
 * messages is the generated module's namespace; buf's STANDARD lint
 * guarantees each method's request type is named <Method>Request.
 */
export function createClient<D extends Record<string, MethodDef>>(
  definition: D,
  messages: Messages,
  address: string,
  opts: ClientOptions = {},
): PromiseClient<D> {
  const security = opts.security ?? INSECURE;
  const hang = opts.hangTimeoutMs ?? DEFAULT_HANG_TIMEOUT_MS;
  const raw = new grpc.Client(address, channelCredentials(security), {
    ...channelOptions,
    "grpc.keepalive_time_ms": Math.max(500, Math.floor(hang / 2)),
    "grpc.keepalive_timeout_ms": Math.max(500, Math.floor(hang / 2)),
    "grpc.keepalive_permit_without_calls": 1,
  });
  const auth = authMetadata(security);
  const defaultDeadline = opts.deadlineMs ?? DEFAULT_DEADLINE_MS;
  const out: Record<string, unknown> = {
    address,
    close: () => raw.close(),
    waitForReady: (deadlineMs: number) =>
      new Promise<void>((resolve, reject) => raw.waitForReady(Date.now() + deadlineMs, (e) => (e ? reject(e) : resolve()))),
  };
  for (const key of Object.keys(definition)) {
    const m = definition[key];
    const [, service, method] = /^\/(.+)\/([^/]+)$/.exec(m.path)!;
    const type = m.requestStream ? (m.responseStream ? "bidi_stream" : "client_stream") : m.responseStream ? "server_stream" : "unary";
    const labels = { grpc_type: type, grpc_service: service, grpc_method: method };
    const msg = messages[`${method}Request`] as { fromPartial(v: unknown): unknown; encode(v: unknown): { finish(): Uint8Array } } | undefined;
    if (!msg) throw new Error(`no message type ${method}Request for ${m.path}`);
    // A Buffer viewing the encoder's output: the generated serializer copies it once more.
    const serialize =
      opts.serializers?.[key] ??
      ((v: unknown) => {
        const u = msg.encode(msg.fromPartial(v)).finish();
        return Buffer.from(u.buffer, u.byteOffset, u.byteLength);
      });
    const deserialize = (b: Buffer) => m.responseDeserialize(b);
    const callOpts = (o?: CallOptions): grpc.CallOptions => {
      const ms = o?.deadlineMs ?? defaultDeadline;
      return Number.isFinite(ms) ? { deadline: Date.now() + ms } : {};
    };
    const md = () => auth?.clone() ?? new grpc.Metadata();
    const track = () => {
      opts.metrics?.started.inc(labels);
      const t0 = process.hrtime.bigint();
      return (code: grpc.status) => {
        opts.metrics?.handled.inc({ ...labels, grpc_code: grpc.status[code] });
        opts.metrics?.handlingSeconds.observe(labels, Number(process.hrtime.bigint() - t0) / 1e9);
      };
    };
    const codeOf = (e: unknown) => ((e as grpc.ServiceError)?.code ?? grpc.status.UNKNOWN) as grpc.status;
    if (!m.requestStream && !m.responseStream) {
      out[key] = (req: unknown, o?: CallOptions) =>
        new Promise((resolve, reject) => {
          const done = track();
          let detach = () => undefined as void;
          const call = raw.makeUnaryRequest(m.path, serialize, deserialize, req, md(), callOpts(o), (err, res) => {
            detach();
            done(err ? codeOf(err) : grpc.status.OK);
            if (err) reject(err);
            else resolve(res);
          });
          detach = onAbort(o?.signal, () => call.cancel());
        });
    } else if (!m.requestStream && m.responseStream) {
      out[key] = (req: unknown, o?: CallOptions) => ({
        async *[Symbol.asyncIterator]() {
          const done = track();
          const call = raw.makeServerStreamRequest(m.path, serialize, deserialize, req, md(), callOpts(o));
          const detach = onAbort(o?.signal, () => call.cancel());
          try {
            for await (const r of call) yield r;
            done(grpc.status.OK);
          } catch (e) {
            done(codeOf(e));
            throw e;
          } finally {
            detach();
            call.cancel();
          }
        },
      });
    } else if (m.requestStream && !m.responseStream) {
      out[key] = (reqs: AsyncIterable<unknown> | Iterable<unknown>, o?: CallOptions) =>
        new Promise((resolve, reject) => {
          const done = track();
          let detach = () => undefined as void;
          const call = raw.makeClientStreamRequest(m.path, serialize, deserialize, md(), callOpts(o), (err, res) => {
            detach();
            done(err ? codeOf(err) : grpc.status.OK);
            if (err) reject(err);
            else resolve(res);
          });
          detach = onAbort(o?.signal, () => call.cancel());
          void (async () => {
            try {
              for await (const r of reqs) {
                if (!call.write(r)) await new Promise((res) => call.once("drain", res));
              }
              call.end();
            } catch (e) {
              call.cancel();
              reject(e);
            }
          })();
        });
    } else {
      out[key] = (o?: CallOptions) => {
        const done = track();
        const call = raw.makeBidiStreamRequest(m.path, serialize, deserialize, md(), callOpts(o));
        call.on("status", (st: grpc.StatusObject) => done(st.code));
        return call;
      };
    }
  }
  return out as PromiseClient<D>;
}

/**
 * grpc.health.v1 Check of one service at address: resolves when it is
 * SERVING, rejects (with the reason) otherwise.
 */
export async function checkHealth(address: string, service: string, opts: { security?: Security; deadlineMs: number }): Promise<void> {
  const { service: definition } = await import("grpc-health-check");
  const Health = grpc.makeGenericClientConstructor(definition as grpc.ServiceDefinition, "Health");
  const client = new Health(address, channelCredentials(opts.security ?? INSECURE), channelOptions) as unknown as grpc.Client & {
    check(req: { service: string }, md: grpc.Metadata, o: grpc.CallOptions, cb: (e: grpc.ServiceError | null, r?: { status: string | number }) => void): void;
  };
  try {
    const res = await new Promise<{ status: string | number }>((resolve, reject) =>
      client.check({ service }, authMetadata(opts.security ?? INSECURE) ?? new grpc.Metadata(), { deadline: Date.now() + opts.deadlineMs }, (e, r) => (e ? reject(e) : resolve(r!))),
    );
    if (res.status !== "SERVING" && res.status !== 1) throw new Error(`${service} is ${res.status}`);
  } catch (err) {
    const e = err as grpc.ServiceError;
    throw new Error(e.code === grpc.status.NOT_FOUND ? `it does not serve ${service}` : (e.details ?? e.message));
  } finally {
    client.close();
  }
}
