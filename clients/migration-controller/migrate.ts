/**
 * Pre-copy live migration between two VMs, following QEMU's contract
 * (migration/migration.c, ram.c):
 *  - round 0 sends every page; each later round begins with a sync of the
 *    dirty state (dirty-sync-count is the round counter) and sends what it
 *    found, while the guest keeps running and dirtying;
 *  - switch over when the bytes still dirty fit in bandwidth x downtime limit
 *    (threshold_size = bw_bytes_per_ms x downtime_limit_ms);
 *  - expected downtime = dirty bytes at the last sync / bandwidth;
 *  - stop-and-copy: pause the source, final sync, send the rest, verify,
 *    resume the destination; downtime is the guest time from pause to resume.
 * There is no round cap unless asked (Xen-style, forcing the switchover); the
 * progress and completion timeouts are KubeVirt's, in guest time.
 *
 * On any failure or interruption (the signal) the source is resumed if we
 * paused it, logging is turned off, the destination we created is destroyed,
 * each with a deadline, and then the source and destination are looked at
 * again so that the report says what was observed; a MigrationError says why.
 */
import { status as GrpcStatus } from "@grpc/grpc-js";
import { ClockDrive, ExitReason, type MemoryChunk, type VmInfo, type WriteMemoryRequest } from "../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import type { HypervisorClient } from "../../services/hypervisor/client.js";
import { RealtimeClock, SteppedClock, type ClockWatch, type MigrationClock } from "./clock.js";
import { MigrationLimits } from "./limits.js";
import { Link, PAGE_SIZE } from "./link.js";
import { MigrationError, type FailureKind } from "./errors.js";
import { createTracker, MechanismError, parseMechanism, type Mechanism } from "./trackers/index.js";
import { CHUNK_ALIGN } from "./trackers/tracker.js";
import { AutoConverge, checkAutoConverge, type AutoConvergeConfig } from "./policies/auto-converge.js";

export { MigrationError, type FailureKind };

export interface MigrationConfig {
  sourceVm: string;
  destinationVm: string;
  mechanism: Mechanism;
  bandwidthBitsPerSecond: number;
  latencyNs: number;
  downtimeLimitMs: number;
  /** null: no cap (QEMU). A number forces the switchover after that many syncs (Xen's last iteration). */
  maxRounds: number | null;
  /** Fail when the remaining bytes have not reached a new low for this long (KubeVirt: 150 s). */
  progressTimeoutS: number;
  /** Fail when the migration takes longer than this many seconds per GiB of guest memory (KubeVirt: 150 s). */
  completionTimeoutPerGiBS: number;
  /** Pages per read/write/CLEAR chunk; a multiple of 64. */
  chunkPages: number;
  /**
   * Wall-clock bound on waiting for a hypervisor: the deadline of ordinary
   * calls, and how soon keepalive finds a peer that stopped answering. Bulk
   * calls (guest steps, page streams, digests) get six times as long, at least a minute.
   */
  rpcTimeoutMs: number;
  /** QEMU's auto-converge with its parameters (policies/auto-converge.ts); null: off, QEMU's default. */
  autoConverge: AutoConvergeConfig | null;
  /**
   * A VMM bug switched on by tests, to show that the verification catches it:
   * Firecracker's multi-slot diff snapshots (PRs #5696/#5705) wrote a slot's
   * pages at the wrong offset when the slot's last page was clean. Here the
   * pages of every slot after the first land one page too high in such a chunk.
   */
  injectSlotOffsetBug?: boolean;
}

export const DEFAULT_CONFIG: Omit<MigrationConfig, "sourceVm" | "destinationVm"> = {
  mechanism: "bitmap",
  bandwidthBitsPerSecond: 10e9,
  latencyNs: 100_000,
  downtimeLimitMs: 300,
  maxRounds: null,
  progressTimeoutS: 150,
  completionTimeoutPerGiBS: 150,
  chunkPages: 262144,
  rpcTimeoutMs: 10_000,
  autoConverge: null,
};

export interface RoundReport {
  /** 0 is the full copy; round i >= 1 sends what sync i found. */
  round: number;
  /** Pages the sync that opened this round found dirty (round 0: every page). */
  dirtyPages: number;
  pagesSent: number;
  normalPages: number;
  zeroPages: number;
  bytesSent: number;
  /** Guest time the round took, sync included. */
  durationMs: number;
  syncHostMs: number;
  /** Pages dirtied per second of guest time since the previous sync (QEMU's dirty-pages-rate). */
  dirtyRatePagesPerSecond: number;
  remainingBytes: number;
  thresholdBytes: number;
  expectedDowntimeMs: number;
  /** Writes per second the guest achieved during the round (its slowdown shows here). */
  guestWritesPerSecond: number;
  /** KVM_EXIT_DIRTY_RING_FULL exits during the round, and the guest time vCPUs spent stalled on them. */
  ringFullExits: number;
  ringStallMs: number;
  /** The stop-and-copy round: the source was paused. */
  stopAndCopy: boolean;
  /** QEMU's cpu-throttle-percentage while the round ran (auto-converge). */
  cpuThrottlePercentage: number;
}

export interface MigrationReport {
  status: "completed" | "failed";
  error?: string;
  source: { address: string; vm: string };
  destination: { address: string; vm: string };
  mechanism: Mechanism;
  drive: "stepped" | "realtime";
  config: Omit<MigrationConfig, "sourceVm" | "destinationVm">;
  memoryBytes: number;
  setupTimeMs: number;
  totalTimeMs: number;
  downtimeMs: number | null;
  expectedDowntimeMs: number | null;
  /** Syncs of the dirty state (QEMU's dirty-sync-count), the final one included. */
  dirtySyncCount: number;
  transferredBytes: number;
  precopyBytes: number;
  downtimeBytes: number;
  normalPages: number;
  zeroPages: number;
  /** Dirty rate at the last sync, pages per second. */
  dirtyRatePagesPerSecond: number;
  /** QEMU's cpu-throttle-percentage at the end of pre-copy (auto-converge; 0: never throttled). */
  cpuThrottlePercentage: number;
  mbps: number;
  rounds: RoundReport[];
  switchover: { round: number; remainingBytes: number; thresholdBytes: number; forced: boolean } | null;
  verification: { sourceSha256: string; destinationSha256: string; match: boolean } | null;
  /** After a failure: what the controller saw when it looked again (null: not looked, or it could not tell). */
  cleanup: CleanupReport | null;
  tracker: Record<string, number>;
  wallTimeMs: number;
}

export interface CleanupReport {
  sourceRunning: boolean | null;
  sourceLogging: boolean | null;
  /** Any vCPU of the source still throttled (auto-converge). */
  sourceThrottled: boolean | null;
  destinationRemoved: boolean | null;
  /** Why a step of the cleanup or a look failed. */
  problems: string[];
}

export interface ProgressEvent {
  phase: "setup" | "round" | "switchover" | "verify" | "done";
  round: number;
  dirtyPages: number;
  remainingBytes: number;
  dirtyRatePagesPerSecond: number;
  expectedDowntimeMs: number;
  elapsedMs: number;
  transferredBytes: number;
  /** Auto-converge's vCPU throttle in force (0: none). */
  cpuThrottlePercentage: number;
}

export interface Endpoints {
  source: HypervisorClient;
  destination: HypervisorClient;
  onProgress?: (e: ProgressEvent) => void;
  /** Aborting it interrupts the migration (SIGINT, SIGTERM): cleanup runs and a MigrationError("interrupted") is thrown. */
  signal?: AbortSignal;
}

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

/** Runs fn against one side, turning its errors into MigrationErrors that name that side. */
async function on<T>(who: "source" | "destination", client: HypervisorClient, fn: () => Promise<T>, signal?: AbortSignal): Promise<T> {
  interrupted(signal);
  try {
    return await fn();
  } catch (err) {
    interrupted(signal);
    throw explain(err, who, client.address);
  }
}

function interrupted(signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw new MigrationError("interrupted", `interrupted${typeof signal.reason === "string" ? ` by ${signal.reason}` : ""}`);
}

/**
 * Undoes what a failed migration changed, each step with a deadline and
 * whatever the others did, then looks at both sides again.
 */
async function cleanUp(
  source: HypervisorClient,
  destination: HypervisorClient,
  vms: { source: string; destination: string },
  did: { paused: boolean; trackerStarted: boolean; destinationCreated: boolean; throttled: boolean },
  stopTracker: () => Promise<void>,
): Promise<CleanupReport> {
  const problems: string[] = [];
  const attempt = async (what: string, fn: () => Promise<unknown>) => {
    try {
      await fn();
    } catch (err) {
      problems.push(`${what}: ${(err as { details?: string }).details ?? (err as Error).message}`);
    }
  };
  if (did.throttled) await attempt("stopping the source's throttle", () => source.setCpuThrottle({ vm: vms.source, percentage: 0 }));
  if (did.paused) await attempt("resuming the source", () => source.resumeVm({ vm: vms.source }));
  if (did.trackerStarted) await attempt("turning logging off on the source", stopTracker);
  if (did.destinationCreated) await attempt("removing the destination VM", () => destination.destroyVm({ vm: vms.destination }));
  const out: CleanupReport = { sourceRunning: null, sourceLogging: null, sourceThrottled: null, destinationRemoved: null, problems };
  await attempt("looking at the source", async () => {
    const v = (await source.getVm({ vm: vms.source })).vm!;
    out.sourceRunning = v.vcpus.some((c) => !c.paused);
    out.sourceLogging = v.memslots.some((m) => m.logging) || v.hardwareDirty || v.pageTrackingDevice;
    out.sourceThrottled = v.vcpus.some((c) => c.cpuThrottlePercentage > 0);
  });
  if (did.destinationCreated) {
    try {
      await destination.getVm({ vm: vms.destination });
      out.destinationRemoved = false;
    } catch (err) {
      if ((err as { code?: number }).code === GrpcStatus.NOT_FOUND) out.destinationRemoved = true;
      else problems.push(`looking at the destination: ${(err as { details?: string }).details ?? (err as Error).message}`);
    }
  }
  return out;
}

function popcount(bytes: Uint8Array, numPages: number): number {
  let n = 0;
  const full = numPages >>> 3;
  for (let i = 0; i < full; i++) {
    let b = bytes[i];
    while (b) {
      b &= b - 1;
      n++;
    }
  }
  for (let i = full * 8; i < numPages; i++) n += (bytes[i >>> 3] >> (i & 7)) & 1;
  return n;
}

function countZeroWords(contents: Uint8Array): number {
  const aligned = contents.byteOffset % 4 === 0 ? contents : new Uint8Array(contents);
  const w = new Int32Array(aligned.buffer, aligned.byteOffset, aligned.byteLength / 4);
  let zero = 0;
  for (let i = 0; i < w.length; i += 2) if ((w[i] | w[i + 1]) === 0) zero++;
  return zero;
}

function orBitmaps(a: Map<number, Uint8Array>, b: Map<number, Uint8Array>): Map<number, Uint8Array> {
  const out = new Map<number, Uint8Array>();
  for (const [slot, x] of a) {
    const y = b.get(slot);
    const z = new Uint8Array(x);
    if (y) for (let i = 0; i < z.length; i++) z[i] |= y[i];
    out.set(slot, z);
  }
  return out;
}

/**
 * The injected bug (injectSlotOffsetBug): a chunk of a slot after the first
 * whose selection leaves the slot's last page clean is written one page too
 * high. The selection's last bit is clear, so the shifted chunk still fits.
 */
function misplaced(chunk: MemoryChunk, slot: number, vm: VmInfo): MemoryChunk {
  const index = vm.memslots.findIndex((m) => m.memslot!.slot === slot);
  const pages = Number(vm.memslots[index].numPages);
  const first = Number(chunk.firstPage);
  const last = chunk.numPages - 1;
  const endsSlot = first + chunk.numPages === pages;
  const lastClean = chunk.bitmap.length > 0 && !((chunk.bitmap[last >>> 3] >> (last & 7)) & 1);
  if (index === 0 || !endsSlot || !lastClean) return chunk;
  return { ...chunk, firstPage: BigInt(first + 1), numPages: chunk.numPages - 1, bitmap: chunk.bitmap.subarray(0, Math.ceil((chunk.numPages - 1) / 8)) };
}

/** Creates the destination with the source's layout, paused, logging off. */
async function createDestination(dst: HypervisorClient, name: string, src: VmInfo): Promise<void> {
  await dst.createVm({
    vm: name,
    vcpus: src.vcpus.length,
    memslots: src.memslots.map((s) => ({ ...s.memslot!, flags: s.memslot!.flags & ~1 })),
    backingPageSize: src.backingPageSize,
    ipaBits: src.ipaBits,
    clock: src.clock,
    realtimeSpeed: src.realtimeSpeed,
    seed: src.seed,
    startPaused: true,
    tlbEntries: src.tlbEntries,
    arch: src.arch,
    pml: src.pml,
  });
}

export async function migrate(cfgIn: Partial<MigrationConfig> & Pick<MigrationConfig, "sourceVm" | "destinationVm">, ep: Endpoints): Promise<MigrationReport> {
  const cfg: MigrationConfig = { ...DEFAULT_CONFIG, ...cfgIn };
  validate(cfg);
  const wall0 = performance.now();
  const { source, destination, signal } = ep;
  const bulk = { deadlineMs: Math.max(60_000, 6 * cfg.rpcTimeoutMs), signal };
  const link = new Link(cfg.bandwidthBitsPerSecond, cfg.latencyNs);
  const src = (await on("source", source, () => source.getVm({ vm: cfg.sourceVm }), signal)).vm!;
  if (src.vcpus.every((v) => v.paused)) {
    throw new MigrationError("precondition", `source VM '${cfg.sourceVm}' is paused; pre-copy migrates a running VM (resume it first)`);
  }
  for (const s of src.memslots) {
    if (s.logging) {
      throw new MigrationError(
        "precondition",
        `slot ${s.memslot!.slot} of source VM '${cfg.sourceVm}' is already logging dirty pages (another migration or tool is using it)`,
      );
    }
  }
  const mechanism = parseMechanism(cfg.mechanism);
  const tracker = createTracker(mechanism, source, src);
  const memoryBytes = Number(src.memoryBytes);
  const bwBytesPerMs = link.bytesPerSecond / 1000;
  const thresholdBytes = bwBytesPerMs * cfg.downtimeLimitMs;
  // The limits apply while pre-copy runs; the switchover is bounded by the threshold instead.
  let limitsOn = false;
  const watch: ClockWatch = {
    nextDeadlineNs: () => (limitsOn ? limits.nextDeadlineNs() : Infinity),
    check: () => {
      interrupted(signal);
      if (limitsOn) limits.check();
    },
  };
  const clock: MigrationClock =
    src.clock === ClockDrive.CLOCK_DRIVE_REALTIME
      ? new RealtimeClock(src.realtimeSpeed || 1, watch)
      : new SteppedClock(source, cfg.sourceVm, {
          maxStepNs: tracker.maxStepNs,
          watch,
          callDeadlineMs: bulk.deadlineMs,
          signal,
          onStep: async (r, stepNs) => {
            const ringFull = r.vcpus.reduce((n, v) => n + v.exits.reduce((m, e) => m + (e.reason === ExitReason.EXIT_REASON_DIRTY_RING_FULL ? Number(e.count) : 0), 0), 0);
            await tracker.onGuestStep?.({ ringFull, stepNs });
          },
        });
  const limits = new MigrationLimits(() => clock.now(), cfg, memoryBytes, thresholdBytes, link.bytesPerSecond);
  const report: MigrationReport = {
    status: "failed",
    source: { address: source.address, vm: cfg.sourceVm },
    destination: { address: destination.address, vm: cfg.destinationVm },
    mechanism: mechanism.name,
    drive: clock.drive,
    config: { ...cfg },
    memoryBytes,
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
    mbps: 0,
    rounds: [],
    switchover: null,
    verification: null,
    cleanup: null,
    tracker: {},
    wallTimeMs: 0,
  };
  delete (report.config as Partial<MigrationConfig>).sourceVm;
  delete (report.config as Partial<MigrationConfig>).destinationVm;

  await on("destination", destination, () => createDestination(destination, cfg.destinationVm, src), signal);
  const did = { paused: false, trackerStarted: false, destinationCreated: true, throttled: false };
  const progress = (phase: ProgressEvent["phase"], r: Partial<ProgressEvent> = {}) =>
    ep.onProgress?.({
      phase,
      round: report.dirtySyncCount,
      dirtyPages: 0,
      remainingBytes: 0,
      dirtyRatePagesPerSecond: report.dirtyRatePagesPerSecond,
      expectedDowntimeMs: report.expectedDowntimeMs ?? 0,
      elapsedMs: clock.now() / 1e6,
      transferredBytes: report.transferredBytes,
      cpuThrottlePercentage: report.cpuThrottlePercentage,
      ...r,
    });

  /** The guest's totals: what it wrote and how long it sat out on full rings. */
  const guestStats = async () => {
    const v = (await on("source", source, () => source.getVm({ vm: cfg.sourceVm }), signal)).vm!;
    return {
      writes: v.vcpus.reduce((n, c) => n + Number(c.writes), 0),
      ringFullExits: v.vcpus.reduce((n, c) => n + Number(c.dirtyRingFullExits), 0),
      ringStallNs: v.vcpus.reduce((n, c) => n + Number(c.dirtyRingStallNs), 0),
    };
  };

  /**
   * Reads one chunk from the source and starts writing it into the
   * destination; returns its zero and normal pages and the pending write, which
   * overlaps the guest time the controller lets pass next. Chunks of a round
   * are disjoint, so two writes may be in flight; a round awaits all of its
   * writes before it ends, so a page re-sent in a later round always lands last.
   */
  const copyChunk = async (slot: number, first: number, count: number, sel: Uint8Array | null) => {
    const chunks: WriteMemoryRequest[] = [];
    let zero = 0;
    let normal = 0;
    try {
      const stream = source.readMemory(
        {
          vm: cfg.sourceVm,
          slot,
          firstPage: BigInt(first),
          numPages: BigInt(count),
          bitmap: sel ? Buffer.from(sel.buffer, sel.byteOffset, sel.byteLength) : undefined,
          chunkPages: count,
        },
        bulk,
      );
      for await (const r of stream) {
        const z = countZeroWords(r.chunk!.contents);
        zero += z;
        normal += r.chunk!.contents.length / 8 - z;
        chunks.push({ vm: cfg.destinationVm, chunk: cfg.injectSlotOffsetBug ? misplaced(r.chunk!, slot, src) : r.chunk });
      }
    } catch (err) {
      interrupted(signal);
      throw explain(err, "source", source.address);
    }
    const written = on("destination", destination, () => destination.writeMemory(chunks, bulk), signal);
    written.catch(() => undefined); // awaited by the caller; this only keeps an early failure from going unhandled
    return { zero, normal, written };
  };

  /**
   * Sends the selected pages of every slot (select null: all pages), chunk by
   * chunk; the guest runs for each chunk's time on the link (and the host time
   * of its CLEAR, with manual protect), and the limits are checked as it
   * passes. remainingBytes is what the pass starts with: QEMU's
   * ram.remaining (the dirty pages not yet sent) falls as each chunk goes,
   * and that is what KubeVirt's progress timeout watches. Returns what was sent.
   */
  const sendPages = async (select: Map<number, Uint8Array> | null, remainingBytes: number) => {
    const out = { normal: 0, zero: 0, bytes: 0 };
    let pending: Promise<unknown> = Promise.resolve();
    for (const s of src.memslots) {
      const slot = s.memslot!.slot;
      const n = Number(s.numPages);
      const bitmap = select ? select.get(slot) : undefined;
      if (select && !bitmap) continue; // not logged (read-only): unchanged since round 0
      for (let first = 0; first < n; first += cfg.chunkPages) {
        const count = Math.min(cfg.chunkPages, n - first);
        const sel = bitmap ? bitmap.subarray(first >>> 3, (first + count + 7) >>> 3) : null;
        if (sel && popcount(sel, count) === 0) continue;
        const all = new Uint8Array(Math.ceil(count / 8)).fill(0xff);
        const hostNs = await on("source", source, () => tracker.beforeSend(slot, first, count, sel ?? all), signal);
        const c = await copyChunk(slot, first, count, sel);
        await pending;
        pending = c.written;
        const bytes = Link.bytesFor(c.normal, c.zero);
        out.normal += c.normal;
        out.zero += c.zero;
        out.bytes += bytes;
        const chunkNs = hostNs + link.transmitNs(bytes);
        if (limitsOn) limits.update(Math.max(0, remainingBytes - (out.normal + out.zero) * PAGE_SIZE), clock.now() + chunkNs);
        await on("source", source, () => clock.elapse(chunkNs), signal);
      }
    }
    await pending;
    await on("source", source, () => clock.elapse(link.latencyNs), signal);
    report.normalPages += out.normal;
    report.zeroPages += out.zero;
    report.transferredBytes += out.bytes;
    return out;
  };

  const finish = () => {
    report.totalTimeMs = clock.now() / 1e6;
    report.mbps = report.totalTimeMs > 0 ? (report.transferredBytes * 8) / (report.totalTimeMs / 1e3) / 1e6 : 0;
    report.tracker = tracker.stats();
    report.wallTimeMs = performance.now() - wall0;
  };

  try {
    progress("setup");
    did.trackerStarted = true;
    const setupNs = await on("source", source, () => tracker.start(), signal);
    await on("source", source, () => clock.elapse(setupNs), signal);
    report.setupTimeMs = clock.now() / 1e6;

    // Round 0: every page, while the guest runs.
    const totalPages = src.memslots.reduce((n, s) => n + Number(s.numPages), 0);
    limits.synced(totalPages * PAGE_SIZE);
    limitsOn = true;
    progress("round", { dirtyPages: totalPages, remainingBytes: totalPages * PAGE_SIZE });
    let roundStart = clock.now();
    const converge = cfg.autoConverge ? new AutoConverge(cfg.autoConverge, clock.now()) : null;
    let atStart = await guestStats();
    let lastSyncAt = clock.now();
    let sent = await sendPages(null, totalPages * PAGE_SIZE);
    report.precopyBytes += sent.bytes;
    const pushRound = async (round: number, dirtyPages: number, syncHostNs: number, rate: number, remaining: number, stopAndCopy = false) => {
      const now = clock.now();
      const g = await guestStats();
      report.rounds.push({
        round,
        dirtyPages,
        pagesSent: sent.normal + sent.zero,
        normalPages: sent.normal,
        zeroPages: sent.zero,
        bytesSent: sent.bytes,
        durationMs: (now - roundStart) / 1e6,
        syncHostMs: syncHostNs / 1e6,
        dirtyRatePagesPerSecond: rate,
        remainingBytes: remaining,
        thresholdBytes,
        expectedDowntimeMs: remaining / bwBytesPerMs,
        guestWritesPerSecond: now > roundStart ? ((g.writes - atStart.writes) * 1e9) / (now - roundStart) : 0,
        ringFullExits: g.ringFullExits - atStart.ringFullExits,
        ringStallMs: (g.ringStallNs - atStart.ringStallNs) / 1e6,
        stopAndCopy,
        cpuThrottlePercentage: converge?.percentage ?? 0,
      });
      roundStart = now;
      atStart = g;
    };
    await pushRound(0, totalPages, 0, 0, totalPages * PAGE_SIZE);

    for (;;) {
      const sync = await on("source", source, () => tracker.sync(false), signal);
      report.dirtySyncCount++;
      const remaining = sync.dirtyPages * PAGE_SIZE;
      limits.synced(remaining);
      await on("source", source, () => clock.elapse(sync.hostNs), signal);
      const now = clock.now();
      const rate = now > lastSyncAt ? (sync.dirtyPages * 1e9) / (now - lastSyncAt) : 0;
      lastSyncAt = now;
      limits.dirtyRatePagesPerSecond = rate;
      report.dirtyRatePagesPerSecond = rate;
      // QEMU evaluates auto-converge's trigger inside the sync, before it decides to switch over.
      const throttle = converge?.onSync(clock.now(), sync.dirtyPages, report.transferredBytes) ?? null;
      if (throttle !== null) {
        did.throttled = true;
        await on("source", source, () => source.setCpuThrottle({ vm: cfg.sourceVm, percentage: throttle }), signal);
        report.cpuThrottlePercentage = throttle;
      }
      report.expectedDowntimeMs = remaining / bwBytesPerMs;
      progress("round", { dirtyPages: sync.dirtyPages, remainingBytes: remaining, dirtyRatePagesPerSecond: rate, expectedDowntimeMs: report.expectedDowntimeMs });

      const forced = cfg.maxRounds !== null && report.dirtySyncCount >= cfg.maxRounds && remaining > thresholdBytes;
      if (remaining <= thresholdBytes || forced) {
        limitsOn = false;
        report.switchover = { round: report.dirtySyncCount, remainingBytes: remaining, thresholdBytes, forced };
        // Stop and copy.
        progress("switchover", { dirtyPages: sync.dirtyPages, remainingBytes: remaining });
        const pauseAt = clock.now();
        did.paused = true;
        await on("source", source, () => source.pauseVm({ vm: cfg.sourceVm }), signal);
        const last = await on("source", source, () => tracker.sync(true), signal);
        report.dirtySyncCount++;
        await on("source", source, () => clock.elapse(last.hostNs), signal);
        const before = report.transferredBytes;
        const union = orBitmaps(sync.bitmaps, last.bitmaps);
        sent = await sendPages(union, remaining);
        report.downtimeBytes = report.transferredBytes - before;
        const unionPages = [...union.values()].reduce((n, b) => n + popcount(b, b.length * 8), 0);
        await pushRound(report.rounds.length, unionPages, sync.hostNs + last.hostNs, rate, remaining, true);
        // The vCPUs' state goes with the memory: the destination's guest goes on where the source's stopped.
        const state = await on("source", source, () => source.getVcpuState({ vm: cfg.sourceVm }), signal);
        await on("destination", destination, () => destination.setVcpuState({ vm: cfg.destinationVm, vcpus: state.vcpus, writeSequence: state.writeSequence }), signal);
        progress("verify");
        const [a, b] = await Promise.all([
          on("source", source, () => source.getMemoryDigest({ vm: cfg.sourceVm }, bulk), signal),
          on("destination", destination, () => destination.getMemoryDigest({ vm: cfg.destinationVm }, bulk), signal),
        ]);
        report.verification = { sourceSha256: a.sha256Hex, destinationSha256: b.sha256Hex, match: a.sha256Hex === b.sha256Hex };
        if (!report.verification.match) {
          throw new MigrationError(
            "verification",
            `verification failed: the destination's memory (sha256 ${b.sha256Hex.slice(0, 16)}…) differs from the source's (${a.sha256Hex.slice(0, 16)}…): dirty pages were lost`,
          );
        }
        await on("destination", destination, () => destination.resumeVm({ vm: cfg.destinationVm }), signal);
        report.downtimeMs = (clock.now() - pauseAt) / 1e6;
        // The guest runs on the destination now: from here on nothing may remove it or resume the source.
        did.paused = false;
        did.destinationCreated = false;
        report.status = "completed";
        try {
          await tracker.stop();
          did.trackerStarted = false;
        } catch (err) {
          const why = (err as { details?: string }).details ?? (err as Error).message;
          report.cleanup = { sourceRunning: false, sourceLogging: null, sourceThrottled: null, destinationRemoved: false, problems: [`turning logging off on the source: ${why}`] };
        }
        // migration_cleanup stops the throttle: a source resumed later runs at full speed.
        if (did.throttled) {
          try {
            await source.setCpuThrottle({ vm: cfg.sourceVm, percentage: 0 });
            did.throttled = false;
          } catch (err) {
            const why = (err as { details?: string }).details ?? (err as Error).message;
            report.cleanup ??= { sourceRunning: false, sourceLogging: null, sourceThrottled: true, destinationRemoved: false, problems: [] };
            report.cleanup.problems.push(`stopping the source's throttle: ${why}`);
          }
        }
        finish();
        progress("done", { remainingBytes: 0 });
        return report;
      }

      sent = await sendPages(sync.bitmaps, remaining);
      report.precopyBytes += sent.bytes;
      await pushRound(report.dirtySyncCount, sync.dirtyPages, sync.hostNs, rate, remaining);
    }
  } catch (err) {
    const e = err instanceof MigrationError ? err : explain(err, "migration", "");
    report.error = e.message;
    // Leave the source as we found it: running, not logging; the destination gone.
    report.cleanup = await cleanUp(source, destination, { source: cfg.sourceVm, destination: cfg.destinationVm }, did, () => tracker.stop());
    finish();
    throw new MigrationError(e.kind, e.message, report);
  }
}


function validate(cfg: MigrationConfig): void {
  const bad = (m: string) => new MigrationError("usage", m);
  if (!(cfg.bandwidthBitsPerSecond > 0) || !Number.isFinite(cfg.bandwidthBitsPerSecond)) throw bad(`bandwidth must be a positive number of bits/s (got ${cfg.bandwidthBitsPerSecond})`);
  if (!(cfg.latencyNs >= 0)) throw bad(`latency must be >= 0 (got ${cfg.latencyNs} ns)`);
  if (!(cfg.downtimeLimitMs > 0)) throw bad(`downtime limit must be > 0 ms (got ${cfg.downtimeLimitMs})`);
  if (cfg.maxRounds !== null && !(Number.isInteger(cfg.maxRounds) && cfg.maxRounds >= 1)) throw bad(`max rounds must be a whole number >= 1 (got ${cfg.maxRounds})`);
  if (!(cfg.progressTimeoutS > 0)) throw bad(`progress timeout must be > 0 s (got ${cfg.progressTimeoutS})`);
  if (!(cfg.completionTimeoutPerGiBS > 0)) throw bad(`completion timeout must be > 0 s per GiB (got ${cfg.completionTimeoutPerGiBS})`);
  if (!Number.isInteger(cfg.chunkPages) || cfg.chunkPages < CHUNK_ALIGN || cfg.chunkPages % CHUNK_ALIGN !== 0 || cfg.chunkPages > 1 << 20) {
    throw bad(`chunk pages must be a multiple of ${CHUNK_ALIGN} up to 1048576 (got ${cfg.chunkPages})`);
  }
  if (!(cfg.rpcTimeoutMs >= 100) || !Number.isFinite(cfg.rpcTimeoutMs)) throw bad(`RPC timeout must be at least 100 ms (got ${cfg.rpcTimeoutMs})`);
  if (!cfg.sourceVm || !cfg.destinationVm) throw bad("source and destination VM names are required");
  const converge = cfg.autoConverge && checkAutoConverge(cfg.autoConverge);
  if (converge) throw bad(`auto-converge: ${converge}`);
  try {
    parseMechanism(cfg.mechanism);
  } catch (e) {
    if (e instanceof MechanismError) throw bad(`mechanism ${e.message}`);
    throw e;
  }
}

