/**
 * The hypervisor's gRPC server: the API's handler groups (api/) bound to one
 * service, beside health, reflection, metrics and the real-time drive. All
 * validation errors come from the model as domain errors; the binding in
 * common/grpc.ts turns them into statuses.
 */
import type { Registry } from "prom-client";
import { GrpcClientMetrics } from "../../common/client.js";
import { createComponentServer, type ComponentServer } from "../../common/component.js";
import { addService, MAX_MESSAGE_BYTES } from "../../common/grpc.js";
import type { Logger } from "../../common/log.js";
import { INSECURE, type Security } from "../../common/security.js";
import * as messages from "../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { HypervisorServiceService } from "../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { serverSerializers } from "./wire.js";
import { SyncClock, type ApiContext, type Handlers } from "./api/context.js";
import { deviceHandlers } from "./api/device.js";
import { dirtyLogHandlers } from "./api/dirty-log.js";
import { dirtyRateHandlers } from "./api/dirty-rate.js";
import { memoryHandlers } from "./api/memory.js";
import { postcopyHandlers } from "./api/postcopy.js";
import { SLICE_MS, vmHandlers } from "./api/vms.js";
import { writeTrackingHandlers } from "./api/write-tracking.js";
import { DeviceRegistry } from "./device-registry.js";
import { HypervisorMetrics } from "./metrics.js";
import { RealtimeDriver } from "./model/clock.js";
import type { Hypervisor } from "./model/hypervisor.js";

export const HYPERVISOR_PROTO = "dirtytrack/hypervisor/v1/hypervisor.proto";
export const HYPERVISOR_SERVICE = "dirtytrack.hypervisor.v1.HypervisorService";

/** Every RPC of the service, from the groups that implement them. */
export function hypervisorHandlers(ctx: ApiContext): Handlers {
  return { ...vmHandlers(ctx), ...dirtyLogHandlers(ctx), ...dirtyRateHandlers(ctx), ...memoryHandlers(ctx), ...postcopyHandlers(ctx), ...writeTrackingHandlers(ctx), ...deviceHandlers(ctx) };
}

export interface HypervisorApiDeps {
  hypervisor: Hypervisor;
  logger: Logger;
  registry: Registry;
  security: Security;
  /** The largest message this server sends. */
  maxMessageBytes: number;
}

/** The service's handlers over one model, with its metrics and device registry: a whole server's, or one VM worker's (shard.ts). */
export function createHypervisorApi(deps: HypervisorApiDeps): { handlers: Handlers; devices: DeviceRegistry } {
  const metrics = new HypervisorMetrics(deps.registry, deps.hypervisor);
  const devices = new DeviceRegistry(deps.hypervisor, deps.logger, metrics, new GrpcClientMetrics(deps.registry), deps.security);
  deps.hypervisor.pageTracking = devices;
  metrics.watchDevice(() => devices.link);
  const ctx: ApiContext = { hv: deps.hypervisor, metrics, devices, maxMessageBytes: deps.maxMessageBytes, lastGet: new SyncClock() };
  return { handlers: hypervisorHandlers(ctx), devices };
}

export interface HypervisorServerDeps {
  hypervisor: Hypervisor;
  logger: Logger;
  registry?: Registry;
  security?: Security;
  /** Real-time drive tick; 0 disables the driver (tests of stepped VMs). */
  realtimeTickMs?: number;
  /** The largest message this server sends (default MAX_MESSAGE_BYTES; tests lower it). */
  maxMessageBytes?: number;
}

export type HypervisorServer = ComponentServer;

/** The service with every VM on the gRPC thread. */
export function createHypervisorServer(deps: HypervisorServerDeps): HypervisorServer {
  const driver = new RealtimeDriver(() => deps.hypervisor.vms.values(), deps.realtimeTickMs ?? 20, SLICE_MS);
  const security = deps.security ?? INSECURE;
  let devices: DeviceRegistry | undefined;
  const app = createComponentServer({
    registry: deps.registry,
    security,
    protoFiles: [HYPERVISOR_PROTO],
    serviceNames: [HYPERVISOR_SERVICE],
    health: () => ({ ok: true, detail: { vms: deps.hypervisor.vms.size } }),
    onListen: () => {
      if (deps.realtimeTickMs !== 0) driver.start();
    },
    onClose: async () => {
      driver.stop();
      if (devices?.link) await devices.unregister(devices.link.address).catch(() => undefined);
    },
  });
  const api = createHypervisorApi({ hypervisor: deps.hypervisor, logger: deps.logger, registry: app.registry, security, maxMessageBytes: deps.maxMessageBytes ?? MAX_MESSAGE_BYTES });
  devices = api.devices;
  addService(app.grpc, HypervisorServiceService, api.handlers, {
    metrics: app.rpcMetrics,
    logger: deps.logger,
    messages,
    serializers: serverSerializers,
  });
  return app;
}
