/**
 * Page-tracking device process: binds gRPC and the ops port, registers with a
 * hypervisor when told where it is, unregisters and exits on SIGTERM.
 *
 *   PTDEVICE_HOST            bind address (127.0.0.1)
 *   PTDEVICE_GRPC_PORT       gRPC port (50061; 0 picks one)
 *   PTDEVICE_HTTP_PORT       /metrics and /healthz (9474; 0 picks one)
 *   PTDEVICE_ADVERTISE       address the hypervisor dials (default host:port)
 *   PTDEVICE_HYPERVISOR      hypervisor to register with (none: wait to be used)
 *   PTDEVICE_LOG_CAPACITY    GPAs a tracker's dirty log may hold (1048576)
 *   LOG_LEVEL                pino level (info)
 */
import { ConfigError, envNumber, envString } from "../../common/config.js";
import { untilSignal } from "../../common/component.js";
import { createLogger } from "../../common/log.js";
import { connectHypervisor } from "../hypervisor/client.js";
import { PageTrackingDevice } from "./model/device.js";
import { createDeviceServer } from "./server.js";

const env = process.env;
if (process.argv.includes("--help")) {
  console.log("usage: page-tracking-device   (configured by environment variables; see services/page-tracking-device/main.ts or the README)");
  process.exit(0);
}
const logger = createLogger("page-tracking-device");
try {
  const host = envString(env, "PTDEVICE_HOST", "127.0.0.1");
  const grpcPort = envNumber(env, "PTDEVICE_GRPC_PORT", 50061, { min: 0, integer: true });
  const httpPort = envNumber(env, "PTDEVICE_HTTP_PORT", 9474, { min: 0, integer: true });
  const device = new PageTrackingDevice({ logCapacity: envNumber(env, "PTDEVICE_LOG_CAPACITY", 1 << 20, { min: 1, integer: true }) });
  const app = createDeviceServer({ device, logger });
  const ports = await app.listen({ host, grpcPort, httpPort });
  const advertise = envString(env, "PTDEVICE_ADVERTISE", `${host}:${ports.grpcPort}`);
  const hvAddress = env.PTDEVICE_HYPERVISOR;
  const hv = hvAddress ? connectHypervisor(hvAddress) : null;
  if (hv) {
    // The hypervisor may still be starting (compose): retry for a while.
    for (let attempt = 1; ; attempt++) {
      try {
        await hv.registerPageTrackingDevice({ address: advertise }, { deadlineMs: 2000 });
        break;
      } catch (err) {
        if (attempt >= 30) throw new ConfigError(`could not register with the hypervisor at ${hvAddress}: ${(err as Error).message}`);
        await new Promise((r) => setTimeout(r, 1000));
      }
    }
    logger.info({ hypervisor: hvAddress, advertise }, "registered with the hypervisor");
  }
  logger.info({ host, ...ports }, "page-tracking device listening");
  if (env.PTDEVICE_ANNOUNCE === "1") console.log(JSON.stringify({ listening: { host, ...ports } }));
  await untilSignal(logger);
  await hv
    ?.unregisterPageTrackingDevice({ address: advertise }, { deadlineMs: 5000 })
    .catch((err: Error) => logger.warn({ hypervisor: hvAddress, reason: err.message }, "could not unregister (is the hypervisor gone?)"));
  hv?.close();
  await app.close();
  process.exit(0);
} catch (err) {
  logger.fatal(err instanceof ConfigError ? {} : { err }, (err as Error).message);
  process.exit(1);
}
