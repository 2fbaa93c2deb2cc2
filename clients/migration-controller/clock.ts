/**
 * How time passes for the controller. Stepped: the source VM's clock moves
 * only when the controller says so, by exactly the time each operation takes
 * (so the guest dirties memory while pages are on the wire, and runs are
 * deterministic). Real time: the VM clocks follow the wall clock, and the
 * controller waits out the simulated time instead.
 */
import type { AdvanceVmResponse } from "../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import type { HypervisorClient } from "../../services/hypervisor/client.js";

export interface MigrationClock {
  readonly drive: "stepped" | "realtime";
  /** Lets ns of guest time pass on the source; returns when they have. */
  elapse(ns: number): Promise<void>;
  /** Guest time since start(), in ns. */
  now(): number;
}

/** AdvanceVm accepts at most an hour per call. */
const MAX_STEP_NS = 3600e9;

export interface SteppedClockOptions {
  /** Longest single AdvanceVm; a mechanism that reacts to exits (ring full) asks for short steps. */
  maxStepNs?: number;
  /** Called after every step with what the guest did. */
  onStep?: (r: AdvanceVmResponse, stepNs: number) => Promise<void>;
}

export class SteppedClock implements MigrationClock {
  readonly drive = "stepped";
  private t = 0;
  private owed = 0;
  constructor(
    private readonly client: HypervisorClient,
    private readonly vm: string,
    private readonly opts: SteppedClockOptions = {},
  ) {}

  async elapse(ns: number): Promise<void> {
    // AdvanceVm takes whole nanoseconds; carry the fractions so that nothing is lost over many calls.
    this.owed += ns;
    let whole = Math.floor(this.owed);
    this.owed -= whole;
    const max = Math.min(this.opts.maxStepNs ?? MAX_STEP_NS, MAX_STEP_NS);
    while (whole > 0) {
      const step = Math.min(whole, max);
      const r = await this.client.advanceVm({ vm: this.vm, durationNs: BigInt(step) });
      this.t += step;
      whole -= step;
      await this.opts.onStep?.(r, step);
    }
  }

  now(): number {
    return this.t;
  }
}

export class RealtimeClock implements MigrationClock {
  readonly drive = "realtime";
  private readonly t0 = performance.now();
  /** speed: guest ns per wall ns, as the VM's real-time drive uses. */
  constructor(private readonly speed: number) {}

  async elapse(ns: number): Promise<void> {
    const ms = ns / 1e6 / this.speed;
    if (ms > 0) await new Promise((r) => setTimeout(r, ms));
  }

  now(): number {
    return (performance.now() - this.t0) * 1e6 * this.speed;
  }
}
