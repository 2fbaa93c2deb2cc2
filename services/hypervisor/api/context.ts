/**
 * What the API's handler groups share: the model, the metrics, the device
 * registry, the server's limits, and the clock of each slot's previous GET.
 */
import type { ServiceHandlers } from "../../../common/grpc.js";
import type { HypervisorServiceService } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import type { DeviceRegistry } from "../device-registry.js";
import type { HypervisorMetrics } from "../metrics.js";
import type { Hypervisor } from "../model/hypervisor.js";
import type { Vm } from "../model/vm.js";

export type Handlers = ServiceHandlers<typeof HypervisorServiceService>;

export interface ApiContext {
  hv: Hypervisor;
  metrics: HypervisorMetrics;
  devices: DeviceRegistry;
  /** The largest message the server sends. */
  maxMessageBytes: number;
  lastGet: SyncClock;
}

/** The guest time of each slot's previous GET, for the dirty rate QEMU computes at every sync. */
export class SyncClock {
  private readonly last = new Map<string, number>();
  forget(vm: string): void {
    for (const k of this.last.keys()) if (k.startsWith(`${vm}/`)) this.last.delete(k);
  }
  rate(vm: Vm, slot: number, dirtyPages: number): number | null {
    const key = `${vm.name}/${slot}`;
    const prev = this.last.get(key);
    this.last.set(key, vm.clockNs);
    return prev !== undefined && vm.clockNs > prev ? (dirtyPages * 1e9) / (vm.clockNs - prev) : null;
  }
}
