/**
 * The scaffolding every component's server shares: a metrics registry with the
 * process metrics and go-grpc-prometheus's RPC families, a gRPC server with
 * health checking and reflection, and the ops HTTP port (/metrics, /healthz).
 * Components add their services and say how healthy they are.
 */
import * as grpc from "@grpc/grpc-js";
import type { FastifyInstance } from "fastify";
import { Registry } from "prom-client";
import { addStandardServices, bindServer, channelOptions, GrpcServerMetrics, shutdownServer } from "./grpc.js";
import { createOpsServer, registerProcessMetrics } from "./http.js";
import type { Logger } from "./log.js";

export interface ComponentServer {
  grpc: grpc.Server;
  ops: FastifyInstance;
  registry: Registry;
  rpcMetrics: GrpcServerMetrics;
  listen(opts: { host: string; grpcPort: number; httpPort: number }): Promise<{ grpcPort: number; httpPort: number }>;
  close(): Promise<void>;
}

export function createComponentServer(opts: {
  registry?: Registry;
  /** .proto files (relative to proto/) for reflection, and the fully qualified services for health. */
  protoFiles: string[];
  serviceNames: string[];
  health: () => { ok: boolean; detail?: unknown };
  /** Runs after both ports are bound, and before the servers close. */
  onListen?: () => void;
  onClose?: () => Promise<void> | void;
}): ComponentServer {
  const registry = opts.registry ?? new Registry();
  registerProcessMetrics(registry);
  const rpcMetrics = new GrpcServerMetrics(registry);
  const server = new grpc.Server(channelOptions);
  const ops = createOpsServer({ registry, health: opts.health });
  let standard = false;
  return {
    grpc: server,
    ops,
    registry,
    rpcMetrics,
    async listen({ host, grpcPort, httpPort }) {
      // Added here, after the component's own services, so that reflection and health list them.
      if (!standard) addStandardServices(server, opts.protoFiles, opts.serviceNames);
      standard = true;
      const g = await bindServer(server, host, grpcPort);
      await ops.listen({ host, port: httpPort });
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
