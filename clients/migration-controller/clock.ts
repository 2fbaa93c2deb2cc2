/**
 * How time passes for the controller. Stepped: the source VM's clock moves
 * only when the controller says so, by exactly the time each operation takes
 * (so the guest dirties memory while pages are on the wire, and runs are
 * deterministic). Real time: the VM clocks follow the wall clock, and the
 * controller waits out the simulated time instead.
 *
 * Either way a long wait is cut at the migration's next deadline (a
 * timeout, see limits.ts) and where the watch callback may end it, so that
 * timeouts and interruptions act when they are due, not at the next sync.
 */
import type { AdvanceVmResponse } from "../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import type { HypervisorClient } from "../../services/hypervisor/client.js";

/** Consulted between steps: the guest time at which to look next, and a check that throws to stop. */
export interface ClockWatch {
  nextDeadlineNs(): number;
  check(): void;
}

export interface MigrationClock {
  readonly drive: "stepped" | "realtime";
  /** Lets ns of guest time pass on the source; returns when they have. */
  elapse(ns: number): Promise<void>;
  /** Counts ns of guest time that passed on the source without elapse (a sync the guest ran through). */
  passed(ns: number): void;
  /** Guest time since start(), in ns. */
  now(): number;
}

/**
 * Longest single AdvanceVm: a second of guest time keeps each call's wall
 * time modest, so that its deadline can stay short.
 */
const MAX_STEP_NS = 1e9;

export interface SteppedClockOptions {
  /** Longest single AdvanceVm; a mechanism that reacts to exits (ring full) asks for short steps. */
  maxStepNs?: number;
  /** Called after every step with what the guest did. */
  onStep?: (r: AdvanceVmResponse, stepNs: number) => Promise<void>;
  watch?: ClockWatch;
  /** The guest time now (a clock that takes over from another goes on from its time). */
  startNs?: number;
  /** Deadline of one AdvanceVm, and the signal that cancels it. */
  callDeadlineMs?: number;
  signal?: AbortSignal;
}

export class SteppedClock implements MigrationClock {
  readonly drive = "stepped";
  private t: number;
  private owed = 0;
  constructor(
    private readonly client: HypervisorClient,
    private readonly vm: string,
    private readonly opts: SteppedClockOptions = {},
  ) {
    this.t = opts.startNs ?? 0;
  }

  async elapse(ns: number): Promise<void> {
    // AdvanceVm takes whole nanoseconds; carry the fractions so that nothing is lost over many calls.
    this.owed += ns;
    let whole = Math.floor(this.owed);
    this.owed -= whole;
    const max = Math.min(this.opts.maxStepNs ?? MAX_STEP_NS, MAX_STEP_NS);
    const watch = this.opts.watch;
    while (whole > 0) {
      watch?.check();
      const toDeadline = watch ? Math.ceil(watch.nextDeadlineNs() - this.t) : Infinity;
      const step = Math.max(1, Math.min(whole, max, toDeadline));
      const r = await this.client.advanceVm({ vm: this.vm, durationNs: BigInt(step) }, { deadlineMs: this.opts.callDeadlineMs, signal: this.opts.signal });
      this.t += step;
      whole -= step;
      await this.opts.onStep?.(r, step);
    }
    watch?.check();
  }

  passed(ns: number): void {
    this.t += ns;
  }

  now(): number {
    return this.t;
  }
}

/** Longest wall-clock sleep between looks at the deadlines and the abort signal. */
const REALTIME_POLL_MS = 50;

export class RealtimeClock implements MigrationClock {
  readonly drive = "realtime";
  private readonly t0 = performance.now();
  /** speed: guest ns per wall ns, as the VM's real-time drive uses; startNs: the guest time now. */
  constructor(
    private readonly speed: number,
    private readonly watch?: ClockWatch,
    private readonly startNs = 0,
  ) {}

  async elapse(ns: number): Promise<void> {
    const until = performance.now() + ns / 1e6 / this.speed;
    for (;;) {
      this.watch?.check();
      const left = until - performance.now();
      if (left <= 0) return;
      await new Promise((r) => setTimeout(r, Math.min(left, REALTIME_POLL_MS)));
    }
  }

  // The wall clock counts it already.
  passed(): void {}

  now(): number {
    return this.startNs + (performance.now() - this.t0) * 1e6 * this.speed;
  }
}
