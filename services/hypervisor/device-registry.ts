/**
 * page_tracking_device_register / _unregister, and the registered device as
 * the model's PageTrackingDriver: one link at a time to the device process,
 * checked before it is accepted, and named by a link id that changes with
 * every new link (so a device can tell a restarted hypervisor apart).
 */
import { randomUUID } from "node:crypto";
import { checkHealth, type GrpcClientMetrics } from "../../common/client.js";
import { alreadyExists, echo, failedPrecondition, invalidArgument, notFound } from "../../common/errors.js";
import type { Logger } from "../../common/log.js";
import type { Security } from "../../common/security.js";
import { DeviceLink, DEVICE_TIMEOUT_MS } from "./device-link.js";
import type { HypervisorMetrics } from "./metrics.js";
import type { Hypervisor } from "./model/hypervisor.js";
import type { PageTrackingDriver } from "./model/page-tracking-device.js";
import type { Vm } from "./model/vm.js";

/** What the page-tracking device must answer to be registered. */
const DEVICE_SERVICE = "dirtytrack.ptdevice.v1.PageTrackingDeviceService";

export class DeviceRegistry implements PageTrackingDriver {
  link: DeviceLink | null = null;
  /** Link ids are this process's instance and a counter: a restarted hypervisor never reuses one. */
  private readonly instance = randomUUID();
  private links = 0;
  constructor(
    private readonly hv: Hypervisor,
    private readonly logger: Logger,
    private readonly metrics: HypervisorMetrics,
    private readonly rpcMetrics: GrpcClientMetrics,
    private readonly security: Security,
  ) {}

  /**
   * page_tracking_device_register: the device announces where it listens. It
   * is accepted only if a page-tracking device answers there; registering the
   * same address again (the device's heartbeat) returns the live link's id.
   */
  async register(address: string): Promise<string> {
    const m = /^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]{1,253}):(\d{1,5})$/.exec(address);
    if (!m || Number(m[2]) < 1 || Number(m[2]) > 65535) {
      throw invalidArgument(`register device: '${echo(address)}' is not host:port with a port in [1, 65535]`, "EINVAL");
    }
    const live = () => {
      if (!this.link || this.link.lost) return null;
      if (this.link.address === address) return this.link.id;
      throw alreadyExists(`register device: a page-tracking device is already registered (${this.link.address})`, "EBUSY");
    };
    const existing = live();
    if (existing) return existing;
    try {
      await checkHealth(address, DEVICE_SERVICE, { security: this.security, deadlineMs: DEVICE_TIMEOUT_MS });
    } catch (err) {
      throw failedPrecondition(`register device: no page-tracking device answers at ${address} (${(err as Error).message})`, "ENODEV");
    }
    const raced = live();
    if (raced) return raced;
    return this.open(address, `${this.instance}/${++this.links}`);
  }

  /**
   * A VM worker's registration (shards.ts): the router registered the device
   * in the first worker, which checked it and named the link; the others
   * open their own link under that name, so the device sees one hypervisor.
   * A link under another name (the device re-registered after a loss) is
   * failed first, which marks its VMs' pages dirty.
   */
  adopt(address: string, id: string): string {
    if (this.link && !this.link.lost && this.link.address === address && this.link.id === id) return id;
    const old = this.link;
    if (old && !old.lost && old.vmCount > 0) old.fail(`the device re-registered as link ${id}`);
    else if (old && !old.lost) void old.close().catch(() => undefined);
    return this.open(address, id);
  }

  private open(address: string, id: string): string {
    this.link = new DeviceLink(
      address,
      id,
      this.logger,
      {
        lost: () => {
          this.hv.deviceRegistered = false;
          this.metrics.deviceLost.inc();
        },
      },
      { metrics: this.rpcMetrics, security: this.security },
    );
    this.hv.deviceRegistered = true;
    this.logger.info({ device: address, link: this.link.id }, "page-tracking device registered");
    return this.link.id;
  }

  async unregister(address: string): Promise<void> {
    if (!this.link || this.link.address !== address) throw notFound(`unregister device: no device registered at ${echo(address)}`);
    const link = this.link;
    this.link = null;
    this.hv.deviceRegistered = false;
    await link.close();
  }

  live(what: string): DeviceLink {
    if (!this.link || this.link.lost) throw failedPrecondition(`${what}: no page-tracking device is registered${this.link?.lost ? ` (the last one was lost: ${this.link.lost})` : ""}`, "EINVAL");
    return this.link;
  }

  owns(vm: Vm): boolean {
    return this.link?.owns(vm) ?? false;
  }

  attach(vm: Vm): Promise<void> {
    return this.live("ENABLE_CAP(ARM_PAGE_TRACKING_DEVICE)").attach(vm);
  }

  async detach(vm: Vm): Promise<void> {
    await this.link?.detach(vm);
  }

  /** The device's arch sync for vm, when it owns vm's dirty state. */
  async sync(vm: Vm): Promise<{ pages: number; hostNs: number }> {
    return this.link?.owns(vm) ? this.link.sync(vm) : { pages: 0, hostNs: 0 };
  }

  flushReports(): void {
    this.link?.send();
  }
}

