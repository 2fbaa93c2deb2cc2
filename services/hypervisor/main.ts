/**
 * Hypervisor process: reads the environment, binds gRPC and the ops HTTP
 * port, and shuts down cleanly on SIGTERM / SIGINT.
 *
 *   HYPERVISOR_HOST            bind address (127.0.0.1)
 *   HYPERVISOR_GRPC_PORT       gRPC port (50051; 0 picks one)
 *   HYPERVISOR_HTTP_PORT       /metrics and /healthz (9464; 0 picks one)
 *   HYPERVISOR_MEMORY_BUDGET   guest memory this host may hold (1TiB)
 *   HYPERVISOR_COST_MODEL      JSON file overriding cost-model defaults
 *   HYPERVISOR_ALLOW_FAULT_INJECTION  1 enables test-only bug switches
 *   LOG_LEVEL                  pino level (info)
 */
import { ConfigError, envBool, envNumber, envString, parseBytes } from "../../common/config.js";
import { untilSignal } from "../../common/component.js";
import { createLogger } from "../../common/log.js";
import { loadCostModel } from "./model/cost-model.js";
import { Hypervisor } from "./model/hypervisor.js";
import { createHypervisorServer } from "./server.js";

const env = process.env;
if (process.argv.includes("--help")) {
  console.log(`usage: hypervisor   (configured by environment variables; see services/hypervisor/main.ts or the README)`);
  process.exit(0);
}
const logger = createLogger("hypervisor");
try {
  const host = envString(env, "HYPERVISOR_HOST", "127.0.0.1");
  const grpcPort = envNumber(env, "HYPERVISOR_GRPC_PORT", 50051, { min: 0, integer: true });
  const httpPort = envNumber(env, "HYPERVISOR_HTTP_PORT", 9464, { min: 0, integer: true });
  const hypervisor = new Hypervisor({
    memoryBudgetBytes: parseBytes(envString(env, "HYPERVISOR_MEMORY_BUDGET", "1TiB")),
    costs: loadCostModel(env.HYPERVISOR_COST_MODEL),
    allowFaultInjection: envBool(env, "HYPERVISOR_ALLOW_FAULT_INJECTION", false),
  });
  const app = createHypervisorServer({ hypervisor, logger });
  const ports = await app.listen({ host, grpcPort, httpPort });
  logger.info({ host, ...ports }, "hypervisor listening");
  // The parent (tests, the embedded demo) reads this line to learn the ports.
  if (env.HYPERVISOR_ANNOUNCE === "1") console.log(JSON.stringify({ listening: { host, ...ports } }));
  await untilSignal(logger);
  await app.close();
  process.exit(0);
} catch (err) {
  // A configuration mistake is the user's to fix: say what, without a stack trace.
  logger.fatal(err instanceof ConfigError ? {} : { err }, (err as Error).message);
  process.exit(1);
}
