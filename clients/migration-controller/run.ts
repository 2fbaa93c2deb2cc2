/**
 * One migration's shared state, as the phases see it: the two sides and how
 * to call them, the clock, the tracker, the policies, the report being
 * written, and what has been changed that a failure must undo.
 */
import { status as GrpcStatus } from "@grpc/grpc-js";
import { ClockDrive, ExitReason, type VmInfo } from "../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import type { HypervisorClient } from "../../services/hypervisor/client.js";
import { RealtimeClock, SteppedClock, type ClockWatch, type MigrationClock } from "./clock.js";
import { MigrationError } from "./errors.js";
import { Link } from "./link.js";
import { policiesFor, type PolicyChain } from "./policies/index.js";
import { createTracker, parseMechanism } from "./trackers/index.js";
import type { DirtyTracker } from "./trackers/tracker.js";
import type { Endpoints, MigrationConfig, MigrationReport, ProgressEvent, RoundReport } from "./types.js";

export type Side = "source" | "destination";

/** Explains a gRPC failure of a call to one hypervisor in the user's terms. */
export function explain(err: unknown, who: string, address: string): MigrationError {
  if (err instanceof MigrationError) return err;
  const e = err as { code?: number; details?: string; message?: string };
  if (e.code === GrpcStatus.UNAVAILABLE || e.code === GrpcStatus.DEADLINE_EXCEEDED) {
    return new MigrationError("unreachable", `cannot reach the ${who} hypervisor at ${address}: ${e.details ?? e.message}`);
  }
  if (e.code === GrpcStatus.NOT_FOUND) return new MigrationError("not-found", `${who} hypervisor at ${address}: ${e.details}`);
  if (e.code === GrpcStatus.FAILED_PRECONDITION || e.code === GrpcStatus.ALREADY_EXISTS || e.code === GrpcStatus.RESOURCE_EXHAUSTED) {
    return new MigrationError("precondition", `${who} hypervisor at ${address}: ${e.details}`);
  }
  if (typeof e.code === "number") return new MigrationError("failed", `${who} hypervisor at ${address} failed: ${e.details ?? e.message}`);
  return new MigrationError("failed", `${who}: ${(err as Error)?.message ?? String(err)}`);
}

export function interrupted(signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw new MigrationError("interrupted", `interrupted${typeof signal.reason === "string" ? ` by ${signal.reason}` : ""}`);
}

/** Runs fn against one side, turning its errors into MigrationErrors that name that side. */
export async function callSide<T>(ep: Endpoints, who: Side, fn: () => Promise<T>): Promise<T> {
  interrupted(ep.signal);
  try {
    return await fn();
  } catch (err) {
    interrupted(ep.signal);
    throw explain(err, who, ep[who].address);
  }
}

/** What one pass put on the wire. */
export interface Sent {
  normal: number;
  zero: number;
  bytes: number;
}

/** What the guest did so far: its writes and the time it sat out on full rings. */
export interface GuestTotals {
  writes: number;
  ringFullExits: number;
  ringStallNs: number;
  pmlFullExits: number;
  hdbssFullFaults: number;
}

export class MigrationRun {
  readonly link: Link;
  readonly bulk: { deadlineMs: number; signal?: AbortSignal };
  readonly tracker: DirtyTracker;
  /** The source's clock until a post-copy switch, the destination's after it. */
  clock: MigrationClock;
  readonly policies: PolicyChain;
  readonly report: MigrationReport;
  readonly memoryBytes: number;
  readonly bwBytesPerMs: number;
  readonly thresholdBytes: number;
  /** What this migration changed, for the cleanup. */
  readonly did = { paused: false, trackerStarted: false, destinationCreated: false, throttled: false, dirtyLimited: false, postcopy: false };
  private readonly wall0 = performance.now();
  /** Where the round being sent began, and the guest's totals then. */
  private roundStart = 0;
  private atRoundStart: GuestTotals = { writes: 0, ringFullExits: 0, ringStallNs: 0, pmlFullExits: 0, hdbssFullFaults: 0 };

  constructor(
    readonly cfg: MigrationConfig,
    readonly ep: Endpoints,
    /** The source as it was found. */
    readonly src: VmInfo,
  ) {
    const { source, signal } = ep;
    this.bulk = { deadlineMs: Math.max(60_000, 6 * cfg.rpcTimeoutMs), signal };
    this.link = new Link(cfg.bandwidthBitsPerSecond, cfg.latencyNs);
    const mechanism = parseMechanism(cfg.mechanism);
    this.tracker = createTracker(mechanism, source, src, src.clock !== ClockDrive.CLOCK_DRIVE_REALTIME);
    this.memoryBytes = Number(src.memoryBytes);
    this.bwBytesPerMs = this.link.bytesPerSecond / 1000;
    this.thresholdBytes = this.bwBytesPerMs * cfg.downtimeLimitMs;
    this.policies = policiesFor(cfg, { memoryBytes: this.memoryBytes, thresholdBytes: this.thresholdBytes, linkBytesPerSecond: this.link.bytesPerSecond, startNs: 0 });
    const watch = this.watch;
    this.clock =
      src.clock === ClockDrive.CLOCK_DRIVE_REALTIME
        ? new RealtimeClock(src.realtimeSpeed || 1, watch)
        : new SteppedClock(source, cfg.sourceVm, {
            maxStepNs: this.tracker.maxStepNs,
            watch,
            callDeadlineMs: this.bulk.deadlineMs,
            signal,
            onStep: async (r, stepNs) => {
              const ringFullVcpus = r.vcpus.filter((v) => v.exits.some((e) => e.reason === ExitReason.EXIT_REASON_DIRTY_RING_FULL && e.count > 0n)).map((v) => v.vcpu);
              await this.tracker.onGuestStep?.({ ringFullVcpus, stepNs });
            },
          });
    const config = { ...cfg } as Partial<MigrationConfig>;
    delete config.sourceVm;
    delete config.destinationVm;
    this.report = {
      status: "failed",
      source: { address: source.address, vm: cfg.sourceVm },
      destination: { address: ep.destination.address, vm: cfg.destinationVm },
      mechanism: mechanism.name,
      drive: this.clock.drive,
      config: config as MigrationReport["config"],
      policies: this.policies.names,
      memoryBytes: this.memoryBytes,
      setupTimeMs: 0,
      totalTimeMs: 0,
      downtimeMs: null,
      expectedDowntimeMs: null,
      dirtySyncCount: 0,
      transferredBytes: 0,
      precopyBytes: 0,
      downtimeBytes: 0,
      normalPages: 0,
      zeroPages: 0,
      dirtyRatePagesPerSecond: 0,
      cpuThrottlePercentage: 0,
      dirtyLimitMBps: 0,
      dirtyLimitThrottleTimePerRoundUs: 0,
      dirtyLimitRingFullTimeUs: 0,
      mbps: 0,
      rounds: [],
      switchover: null,
      postcopy: null,
      verification: null,
      cleanup: null,
      tracker: {},
      wallTimeMs: 0,
    };
  }

  /** What a clock consults between steps: the policies' deadlines, and the interruption. */
  readonly watch: ClockWatch = {
    nextDeadlineNs: () => this.policies.nextDeadlineNs(),
    check: () => {
      interrupted(this.ep.signal);
      const d = this.policies.check(this.clock.now());
      if (d.kind === "fail") throw new MigrationError(d.failure, d.message);
    },
  };

  get source(): HypervisorClient {
    return this.ep.source;
  }

  get destination(): HypervisorClient {
    return this.ep.destination;
  }

  on<T>(who: Side, fn: () => Promise<T>): Promise<T> {
    return callSide(this.ep, who, fn);
  }

  /** Lets guest time pass on the source (the watch may end the migration on the way). */
  elapse(ns: number): Promise<void> {
    return this.on("source", () => this.clock.elapse(ns));
  }

  progress(phase: ProgressEvent["phase"], r: Partial<ProgressEvent> = {}): void {
    const report = this.report;
    this.ep.onProgress?.({
      phase,
      round: report.dirtySyncCount,
      dirtyPages: 0,
      remainingBytes: 0,
      dirtyRatePagesPerSecond: report.dirtyRatePagesPerSecond,
      expectedDowntimeMs: report.expectedDowntimeMs ?? 0,
      elapsedMs: this.clock.now() / 1e6,
      transferredBytes: report.transferredBytes,
      cpuThrottlePercentage: report.cpuThrottlePercentage,
      dirtyLimitMBps: report.dirtyLimitMBps,
      ...r,
    });
  }

  async guestTotals(): Promise<GuestTotals> {
    const v = (await this.on("source", () => this.source.getVm({ vm: this.cfg.sourceVm }))).vm!;
    return {
      writes: v.vcpus.reduce((n, c) => n + Number(c.writes), 0),
      ringFullExits: v.vcpus.reduce((n, c) => n + Number(c.dirtyRingFullExits), 0),
      ringStallNs: v.vcpus.reduce((n, c) => n + Number(c.dirtyRingStallNs), 0),
      pmlFullExits: v.vcpus.reduce((n, c) => n + Number(c.pmlFullExits), 0),
      hdbssFullFaults: v.vcpus.reduce((n, c) => n + Number(c.hdbssFullFaults), 0),
    };
  }

  /** The first round begins now. */
  async beginRounds(): Promise<void> {
    this.roundStart = this.clock.now();
    this.atRoundStart = await this.guestTotals();
  }

  /** Closes the round being sent with what it sent and what the guest did meanwhile; the next one begins. */
  async endRound(
    r: Pick<RoundReport, "round" | "dirtyPages" | "syncHostMs" | "dirtyRatePagesPerSecond" | "vcpuDirtyRatesPagesPerSecond" | "remainingBytes" | "stopAndCopy"> & { fallbackSyncs?: number; etaMs?: number | null; endedMigration?: boolean },
    sent: Sent,
  ): Promise<void> {
    const now = this.clock.now();
    const g = await this.guestTotals();
    const a = this.atRoundStart;
    this.report.rounds.push({
      ...r,
      etaMs: r.etaMs ?? null,
      fallbackSyncs: r.fallbackSyncs ?? 0,
      endedMigration: r.endedMigration ?? false,
      postcopy: false,
      pagesSent: sent.normal + sent.zero,
      normalPages: sent.normal,
      zeroPages: sent.zero,
      bytesSent: sent.bytes,
      durationMs: (now - this.roundStart) / 1e6,
      thresholdBytes: this.thresholdBytes,
      expectedDowntimeMs: r.remainingBytes / this.bwBytesPerMs,
      guestWritesPerSecond: now > this.roundStart ? ((g.writes - a.writes) * 1e9) / (now - this.roundStart) : 0,
      ringFullExits: g.ringFullExits - a.ringFullExits,
      ringStallMs: (g.ringStallNs - a.ringStallNs) / 1e6,
      pmlFullExits: g.pmlFullExits - a.pmlFullExits,
      hdbssFullFaults: g.hdbssFullFaults - a.hdbssFullFaults,
      cpuThrottlePercentage: this.report.cpuThrottlePercentage,
      dirtyLimitThrottleTimePerRoundUs: this.report.dirtyLimitThrottleTimePerRoundUs,
      dirtyLimitRingFullTimeUs: this.report.dirtyLimitRingFullTimeUs,
    });
    this.roundStart = now;
    this.atRoundStart = g;
  }

  finish(): void {
    const r = this.report;
    r.totalTimeMs = this.clock.now() / 1e6;
    r.mbps = r.totalTimeMs > 0 ? (r.transferredBytes * 8) / (r.totalTimeMs / 1e3) / 1e6 : 0;
    r.tracker = this.tracker.stats();
    r.wallTimeMs = performance.now() - this.wall0;
  }
}
