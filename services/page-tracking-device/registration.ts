/**
 * The device's registration with its hypervisor, kept alive: register, then
 * register again every heartbeat (idempotent while the hypervisor's link is
 * up). A hypervisor that restarted, or that dropped the device as lost,
 * answers with a new link id: the device then releases the trackers of the
 * old link, whose VMs are gone or back on write protection. Failures are
 * retried with exponential backoff, forever, until stop().
 */
import type { Logger } from "../../common/log.js";
import type { HypervisorClient } from "../hypervisor/client.js";
import type { PageTrackingDevice } from "./model/device.js";

export interface RegistrationOptions {
  heartbeatMs: number;
  /** First retry delay; it doubles up to maxBackoffMs. */
  minBackoffMs: number;
  maxBackoffMs: number;
}

export const DEFAULT_REGISTRATION: RegistrationOptions = { heartbeatMs: 2000, minBackoffMs: 250, maxBackoffMs: 10_000 };

export class Registration {
  /** The hypervisor link this device serves now; null until the first registration. */
  linkId: string | null = null;
  registered = false;
  attempts = 0;
  private stopped = false;
  private wake: (() => void) | null = null;
  private loop: Promise<void> | null = null;
  private onFirst: (() => void) | null = null;
  /** Resolves at the first successful registration. */
  readonly first = new Promise<void>((resolve) => (this.onFirst = resolve));

  constructor(
    private readonly hypervisor: HypervisorClient,
    private readonly advertise: string,
    private readonly device: PageTrackingDevice,
    private readonly logger: Logger,
    private readonly opts: RegistrationOptions = DEFAULT_REGISTRATION,
  ) {}

  start(): void {
    this.loop ??= this.run();
  }

  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const t = setTimeout(resolve, ms);
      this.wake = () => {
        clearTimeout(t);
        resolve();
      };
    });
  }

  private async run(): Promise<void> {
    let backoff = this.opts.minBackoffMs;
    while (!this.stopped) {
      this.attempts++;
      try {
        const { linkId } = await this.hypervisor.registerPageTrackingDevice({ address: this.advertise }, { deadlineMs: 5000 });
        if (linkId !== this.linkId) {
          const released = this.device.releaseOrphans(linkId);
          this.logger.info({ hypervisor: this.hypervisor.address, advertise: this.advertise, link: linkId, released }, "registered with the hypervisor");
          this.linkId = linkId;
        }
        this.registered = true;
        this.onFirst?.();
        backoff = this.opts.minBackoffMs;
        await this.sleep(this.opts.heartbeatMs);
      } catch (err) {
        if (this.stopped) break;
        if (this.registered || this.attempts === 1) {
          this.logger.warn({ hypervisor: this.hypervisor.address, reason: (err as Error).message, retryMs: backoff }, "cannot register with the hypervisor; retrying");
        }
        this.registered = false;
        await this.sleep(backoff);
        backoff = Math.min(backoff * 2, this.opts.maxBackoffMs);
      }
    }
  }

  /** Ends the loop; the caller unregisters if it wants to. */
  async stop(): Promise<void> {
    this.stopped = true;
    this.onFirst?.();
    this.wake?.();
    await this.loop;
  }
}
