/** The operations endpoint every component serves beside its gRPC port: /metrics and /healthz. */
import Fastify, { type FastifyInstance } from "fastify";
import { collectDefaultMetrics, type Registry } from "prom-client";

export function createOpsServer(opts: {
  registry: Registry;
  /** The exposition /metrics serves (default: the registry's); a router adds its workers' metrics. */
  metrics?: () => Promise<string>;
  health: () => { ok: boolean; detail?: unknown };
  /** HTTPS (and client certificates, with a CA) instead of plain HTTP. */
  https?: { cert: Buffer; key: Buffer; ca?: Buffer; requestCert: boolean; rejectUnauthorized: boolean } | null;
}): FastifyInstance {
  // fastify's types split on https; both forms are the same server to us.
  const app = (opts.https ? Fastify({ logger: false, https: opts.https }) : Fastify({ logger: false })) as unknown as FastifyInstance;
  app.get("/metrics", async (_req, reply) => {
    reply.header("content-type", opts.registry.contentType);
    return opts.metrics ? opts.metrics() : opts.registry.metrics();
  });
  app.get("/healthz", async (_req, reply) => {
    const h = opts.health();
    reply.code(h.ok ? 200 : 503);
    return { status: h.ok ? "ok" : "unhealthy", ...(h.detail === undefined ? {} : { detail: h.detail }) };
  });
  return app;
}

/**
 * prom-client's default process and Node.js metrics, less the three gauges it
 * names with a _total suffix (which `promtool check metrics` rightly rejects).
 */
export function registerProcessMetrics(registry: Registry): void {
  collectDefaultMetrics({ register: registry });
  for (const name of ["nodejs_active_handles_total", "nodejs_active_requests_total", "nodejs_active_resources_total"]) registry.removeSingleMetric(name);
}
