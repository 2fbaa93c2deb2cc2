/**
 * Hypervisor process: reads the environment, binds gRPC and the ops HTTP
 * port, and shuts down cleanly on SIGTERM / SIGINT.
 */
import { availableParallelism, totalmem } from "node:os";
import { ConfigError, envBool, envHost, envPort, parseBytes } from "../../common/config.js";
import { runMain, untilSignal } from "../../common/component.js";
import { securityFromEnv } from "../../common/security.js";
import { loadCostModel } from "./model/cost-model.js";
import { Hypervisor } from "./model/hypervisor.js";
import { createHypervisorServer } from "./server.js";
import { createShardedHypervisorServer } from "./shards.js";

const HELP = `usage: hypervisor   (configured by environment variables)

  HYPERVISOR_HOST            bind address (127.0.0.1)
  HYPERVISOR_GRPC_PORT       gRPC port (50051; 0 picks one)
  HYPERVISOR_HTTP_PORT       /metrics and /healthz (9464; 0 picks one)
  HYPERVISOR_MEMORY_BUDGET   memory this process may allocate for its VMs (half of this machine's RAM);
                             about 16 bytes per 4 KiB guest page, plus logs, TLBs and rings
  HYPERVISOR_COST_MODEL      JSON file overriding cost-model defaults
  HYPERVISOR_ALLOW_FAULT_INJECTION  1 enables test-only bug switches
  HYPERVISOR_VM_WORKERS      worker threads the VMs run in (0: on the gRPC thread, the default;
                             "auto": one per CPU); each VM lives in one, chosen when it is created
  TLS_CERT_FILE, TLS_KEY_FILE, TLS_CA_FILE, AUTH_TOKEN   TLS, mutual TLS and a bearer token (see the README)
  LOG_LEVEL                  fatal, error, warn, info (default), debug, trace or silent`;

/** HYPERVISOR_VM_WORKERS: a count in [0, 64], or "auto" for one per CPU. */
function vmWorkers(value: string | undefined): number {
  if (value === undefined || value === "") return 0;
  if (value === "auto") return availableParallelism();
  const n = Number(value);
  if (!Number.isInteger(n) || n < 0 || n > 64) throw new ConfigError(`HYPERVISOR_VM_WORKERS=${value}: not a count of worker threads in [0, 64] or "auto"`);
  return n;
}

await runMain("hypervisor", HELP, async (logger) => {
  const env = process.env;
  const host = envHost(env, "HYPERVISOR_HOST");
  const grpcPort = envPort(env, "HYPERVISOR_GRPC_PORT", 50051);
  const httpPort = envPort(env, "HYPERVISOR_HTTP_PORT", 9464);
  let budget: number;
  try {
    budget = env.HYPERVISOR_MEMORY_BUDGET ? parseBytes(env.HYPERVISOR_MEMORY_BUDGET) : Math.floor(totalmem() / 2);
  } catch (err) {
    throw new ConfigError(`HYPERVISOR_MEMORY_BUDGET: ${(err as Error).message}`);
  }
  const security = securityFromEnv(env);
  const options = {
    memoryBudgetBytes: budget,
    costs: loadCostModel(env.HYPERVISOR_COST_MODEL),
    allowFaultInjection: envBool(env, "HYPERVISOR_ALLOW_FAULT_INJECTION", false),
  };
  const workers = vmWorkers(env.HYPERVISOR_VM_WORKERS);
  const app = workers > 0 ? createShardedHypervisorServer({ ...options, workers, logger, security }) : createHypervisorServer({ hypervisor: new Hypervisor(options), logger, security });
  const ports = await app.listen({ host, grpcPort, httpPort, vars: { grpcPort: "HYPERVISOR_GRPC_PORT", httpPort: "HYPERVISOR_HTTP_PORT" } });
  logger.info({ host, ...ports, workers, tls: security.cert !== null, mtls: security.ca !== null, token: security.token !== null }, "hypervisor listening");
  // The parent (tests, the embedded demo) reads this line to learn the ports.
  if (env.HYPERVISOR_ANNOUNCE === "1") console.log(JSON.stringify({ listening: { host, ...ports } }));
  await untilSignal(logger);
  await app.close();
});
