/** A promise client of the hypervisor service (for the migration controller, the device, tests and tools). */
import { createClient, type ClientOptions, type PromiseClient } from "../../common/client.js";
import * as messages from "../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { clientSerializers } from "./wire.js";

export type HypervisorClient = PromiseClient<typeof messages.HypervisorServiceService>;

export function connectHypervisor(address: string, opts: ClientOptions = {}): HypervisorClient {
  return createClient(messages.HypervisorServiceService, messages, address, { ...opts, serializers: clientSerializers });
}
