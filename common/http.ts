/** The operations endpoint every component serves beside its gRPC port: /metrics and /healthz. */
import Fastify, { type FastifyInstance } from "fastify";
import type { Registry } from "prom-client";

export function createOpsServer(opts: { registry: Registry; health: () => { ok: boolean; detail?: unknown } }): FastifyInstance {
  const app = Fastify({ logger: false });
  app.get("/metrics", async (_req, reply) => {
    reply.header("content-type", opts.registry.contentType);
    return opts.registry.metrics();
  });
  app.get("/healthz", async (_req, reply) => {
    const h = opts.health();
    reply.code(h.ok ? 200 : 503);
    return { status: h.ok ? "ok" : "unhealthy", ...(h.detail === undefined ? {} : { detail: h.detail }) };
  });
  return app;
}
