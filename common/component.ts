/**
 * The scaffolding every component's server shares: a metrics registry with the
 * process metrics and go-grpc-prometheus's RPC families, a gRPC server with
 * health checking, reflection, keepalive and (when configured) TLS and a
 * bearer token, and the ops HTTP port (/metrics, /healthz). Components add
 * their services and say how healthy they are.
 */
import * as grpc from "@grpc/grpc-js";
import type { FastifyInstance } from "fastify";
import { Registry } from "prom-client";
import { ConfigError } from "./config.js";
import { addStandardServices, bindServer, channelOptions, GrpcServerMetrics, shutdownServer } from "./grpc.js";
import { createOpsServer, registerProcessMetrics } from "./http.js";
import { createLogger, type Logger } from "./log.js";
import { authInterceptor, httpsOptions, INSECURE, serverCredentials, type Security } from "./security.js";

export interface ListenOptions {
  host: string;
  grpcPort: number;
  httpPort: number;
  /** The variables the ports came from, for the message when one cannot be bound. */
  vars?: { grpcPort: string; httpPort: string };
}

export interface ComponentServer {
  grpc: grpc.Server;
  ops: FastifyInstance;
  registry: Registry;
  rpcMetrics: GrpcServerMetrics;
  security: Security;
  listen(opts: ListenOptions): Promise<{ grpcPort: number; httpPort: number }>;
  close(): Promise<void>;
}

/** Why a port cannot be had, in a user's words. */
function bindFailure(err: unknown, what: string, variable: string | undefined, host: string, port: number): ConfigError {
  const text = `${(err as NodeJS.ErrnoException)?.code ?? ""} ${(err as Error)?.message ?? String(err)}`;
  const reason = /EADDRINUSE|address already in use|No address added/i.test(text)
    ? "the address is in use"
    : /EACCES|permission/i.test(text)
      ? "permission denied"
      : /EADDRNOTAVAIL|ENOTFOUND|EAI_AGAIN|cannot assign|getaddrinfo/i.test(text)
        ? "no such local address"
        : text.trim();
  return new ConfigError(`${variable ? `${variable}=${port}: ` : ""}cannot listen on ${host}:${port} for ${what}: ${reason}`);
}

export function createComponentServer(opts: {
  registry?: Registry;
  security?: Security;
  /** .proto files (relative to proto/) for reflection, and the fully qualified services for health. */
  protoFiles: string[];
  serviceNames: string[];
  health: () => { ok: boolean; detail?: unknown };
  /** What /metrics serves, when more than the registry (see createOpsServer). */
  metrics?: () => Promise<string>;
  /** Runs after both ports are bound, and before the servers close. */
  onListen?: () => void;
  onClose?: () => Promise<void> | void;
}): ComponentServer {
  const registry = opts.registry ?? new Registry();
  const security = opts.security ?? INSECURE;
  registerProcessMetrics(registry);
  const rpcMetrics = new GrpcServerMetrics(registry);
  const server = new grpc.Server({
    ...channelOptions,
    // Find clients that vanished without closing (their server streams would otherwise live on).
    "grpc.keepalive_time_ms": 30_000,
    "grpc.keepalive_timeout_ms": 10_000,
    interceptors: security.token ? [authInterceptor(security.token)] : [],
  });
  const ops = createOpsServer({ registry, metrics: opts.metrics, health: opts.health, https: httpsOptions(security) });
  let standard = false;
  return {
    grpc: server,
    ops,
    registry,
    rpcMetrics,
    security,
    async listen({ host, grpcPort, httpPort, vars }) {
      // Added here, after the component's own services, so that reflection and health list them.
      if (!standard) addStandardServices(server, opts.protoFiles, opts.serviceNames);
      standard = true;
      const g = await bindServer(server, host, grpcPort, serverCredentials(security)).catch((err) => {
        throw bindFailure(err, "gRPC", vars?.grpcPort, host, grpcPort);
      });
      try {
        await ops.listen({ host, port: httpPort });
      } catch (err) {
        server.forceShutdown();
        throw bindFailure(err, "the ops port", vars?.httpPort, host, httpPort);
      }
      const addr = ops.server.address();
      opts.onListen?.();
      return { grpcPort: g, httpPort: typeof addr === "object" && addr ? addr.port : httpPort };
    },
    async close() {
      await opts.onClose?.();
      await shutdownServer(server);
      await ops.close();
    },
  };
}

/** Resolves on the first SIGTERM or SIGINT; a process's main awaits it, then shuts down and exits 0. */
export function untilSignal(logger: Logger): Promise<void> {
  return new Promise((resolve) => {
    const stop = (signal: string) => {
      logger.info({ signal }, "shutting down");
      resolve();
    };
    process.once("SIGTERM", () => stop("SIGTERM"));
    process.once("SIGINT", () => stop("SIGINT"));
  });
}

/**
 * A service process's main: --help, a logger at LOG_LEVEL, the body, exit 0.
 * A configuration mistake (ConfigError: a bad variable, a port in use) is
 * one plain line on stderr naming it, and exit 1, never a stack trace.
 */
export async function runMain(component: string, help: string, body: (logger: Logger) => Promise<void>): Promise<never> {
  if (process.argv.includes("--help") || process.argv.includes("-h")) {
    process.stdout.write(`${help}\n`);
    process.exit(0);
  }
  let logger: Logger | null = null;
  try {
    logger = createLogger(component);
    // grpc-js's own log lines (a failed bind, a reset connection) surface as our statuses and messages; keep them for debugging.
    const debug = logger.debug.bind(logger);
    grpc.setLogger({ error: (...a: unknown[]) => debug({ grpc: a.join(" ") }, "grpc-js") });
    await body(logger);
    process.exit(0);
  } catch (err) {
    if (err instanceof ConfigError) process.stderr.write(`${component}: ${err.message}\n`);
    else if (logger) logger.fatal({ err }, (err as Error).message);
    else process.stderr.write(`${component}: ${(err as Error)?.message ?? String(err)}\n`);
    process.exit(1);
  }
}
