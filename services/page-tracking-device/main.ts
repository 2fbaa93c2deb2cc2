/**
 * Page-tracking device process: binds gRPC and the ops port, keeps itself
 * registered with a hypervisor when told where it is, unregisters and exits
 * on SIGTERM.
 */
import { envHost, envNumber, envPort, envString } from "../../common/config.js";
import { runMain, untilSignal } from "../../common/component.js";
import { securityFromEnv } from "../../common/security.js";
import { connectHypervisor } from "../hypervisor/client.js";
import { DEFAULT_MAX_TRACKERS, PageTrackingDevice } from "./model/device.js";
import { DEFAULT_REGISTRATION, Registration } from "./registration.js";
import { createDeviceServer } from "./server.js";

const HELP = `usage: page-tracking-device   (configured by environment variables)

  PTDEVICE_HOST            bind address (127.0.0.1)
  PTDEVICE_GRPC_PORT       gRPC port (50061; 0 picks one)
  PTDEVICE_HTTP_PORT       /metrics and /healthz (9474; 0 picks one)
  PTDEVICE_ADVERTISE       address the hypervisor dials (default host:port)
  PTDEVICE_HYPERVISOR      hypervisor to register with and keep registered with (none: wait to be used)
  PTDEVICE_HEARTBEAT_MS    how often the registration is renewed (2000)
  PTDEVICE_LOG_CAPACITY    GPAs a tracker's dirty log may hold (1048576)
  PTDEVICE_MAX_TRACKERS    trackers the device holds at once (${DEFAULT_MAX_TRACKERS})
  TLS_CERT_FILE, TLS_KEY_FILE, TLS_CA_FILE, AUTH_TOKEN   TLS, mutual TLS and a bearer token (see the README)
  LOG_LEVEL                fatal, error, warn, info (default), debug, trace or silent`;

await runMain("page-tracking-device", HELP, async (logger) => {
  const env = process.env;
  const host = envHost(env, "PTDEVICE_HOST");
  const grpcPort = envPort(env, "PTDEVICE_GRPC_PORT", 50061);
  const httpPort = envPort(env, "PTDEVICE_HTTP_PORT", 9474);
  const heartbeatMs = envNumber(env, "PTDEVICE_HEARTBEAT_MS", DEFAULT_REGISTRATION.heartbeatMs, { min: 50, integer: true });
  const security = securityFromEnv(env);
  const device = new PageTrackingDevice({
    logCapacity: envNumber(env, "PTDEVICE_LOG_CAPACITY", 1 << 20, { min: 1, integer: true }),
    maxTrackers: envNumber(env, "PTDEVICE_MAX_TRACKERS", DEFAULT_MAX_TRACKERS, { min: 1, integer: true }),
  });
  const app = createDeviceServer({ device, logger, security });
  const ports = await app.listen({ host, grpcPort, httpPort, vars: { grpcPort: "PTDEVICE_GRPC_PORT", httpPort: "PTDEVICE_HTTP_PORT" } });
  const advertise = envString(env, "PTDEVICE_ADVERTISE", `${host}:${ports.grpcPort}`);
  const hvAddress = env.PTDEVICE_HYPERVISOR;
  const hv = hvAddress ? connectHypervisor(hvAddress, { security }) : null;
  const registration = hv ? new Registration(hv, advertise, device, logger, { ...DEFAULT_REGISTRATION, heartbeatMs }) : null;
  registration?.start();
  const stop = untilSignal(logger);
  logger.info({ host, ...ports }, "page-tracking device listening");
  // The parent (tests, the demo) reads this line and then uses the device: announce once it is registered.
  if (registration && env.PTDEVICE_ANNOUNCE === "1") await Promise.race([registration.first, stop]);
  if (env.PTDEVICE_ANNOUNCE === "1") console.log(JSON.stringify({ listening: { host, ...ports } }));
  await stop;
  await registration?.stop();
  await hv
    ?.unregisterPageTrackingDevice({ address: advertise }, { deadlineMs: 5000 })
    .catch((err: Error) => logger.warn({ hypervisor: hvAddress, reason: err.message }, "could not unregister (is the hypervisor gone?)"));
  hv?.close();
  await app.close();
});
