/**
 * Post-copy (QEMU's postcopy_start and the source's postcopy loop): the
 * source is paused, a last sync collects what it still had dirty, the vCPUs'
 * state goes over, those pages become missing on the destination, and the
 * destination resumes: the downtime is the switch itself. Then the guest
 * runs there while the source pushes the missing pages in order in the
 * background, and each page a destination vCPU waits for (a page request on
 * the WatchPageRequests stream) jumps the queue: with postcopy-preempt on a
 * channel of its own (it waits for nothing but the link), without it behind
 * the batch of pushed pages already on the wire. Pages land at the guest
 * time the link delivers them (the destination resolves its faults then).
 *
 * From the switch on neither side holds the whole guest: a failure of the
 * source, the link or the controller loses the VM (MigrationError
 * "postcopy-lost"), as in QEMU; the source is not resumed (its memory is
 * older than the destination's) and the destination is kept running, as
 * QEMU's postcopy-paused leaves it: its vCPUs wait on the pages that never
 * come, the rest of the guest goes on.
 */
import type { VmInfo, WatchPageRequestsResponse } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { RealtimeClock, SteppedClock } from "../clock.js";
import { MigrationError } from "../errors.js";
import { Link, NORMAL_PAGE_BYTES } from "../link.js";
import type { MigrationRun } from "../run.js";
import { orBitmaps, popcount } from "../transfer.js";
import type { PrecopyEnd } from "./precopy.js";

/** Pages pushed in one background batch: what a request waits behind without preempt (2 MiB). */
const PUSH_BATCH_PAGES = 512;
/** The widest page range one batch spans (ReadMemory's chunk limit). */
const MAX_SPAN_PAGES = 1 << 20;
/** The shortest guest step while the guest runs on the destination, however short the link's round trip. */
const MIN_STEP_NS = 50_000;
/** The longest: a page request is answered within a step of being raised. */
const MAX_STEP_NS = 1_000_000;

/** One page as the link carries it, read from the source. */
interface Page {
  page: number;
  contents: Buffer;
}

export async function postcopy(run: MigrationRun, end: PrecopyEnd): Promise<void> {
  const { report, tracker, cfg, source, destination } = run;
  const { sync, remainingBytes } = end;
  const preempt = cfg.postcopy?.preempt ?? false;
  report.switchover = { round: report.dirtySyncCount, remainingBytes, thresholdBytes: run.thresholdBytes, forced: false, postcopy: true };
  run.progress("switchover", { dirtyPages: sync.dirtyPages, remainingBytes });
  const pauseAt = run.clock.now();
  run.did.paused = true;
  await run.on("source", () => source.pauseVm({ vm: cfg.sourceVm }));
  const last = await run.on("source", () => tracker.sync(true));
  report.dirtySyncCount++;
  await run.elapse(last.hostNs);
  const missing = orBitmaps(sync.bitmaps, last.bitmaps);
  const missingPages = [...missing.values()].reduce((n, b) => n + popcount(b, b.length * 8), 0);
  const state = await run.on("source", () => source.getVcpuState({ vm: cfg.sourceVm }));
  await run.on("destination", () => destination.setVcpuState({ vm: cfg.destinationVm, vcpus: state.vcpus, writeSequence: state.writeSequence }));
  await run.on("destination", () => destination.startPostcopy({ vm: cfg.destinationVm, missing: [...missing].map(([slot, bitmap]) => ({ slot, bitmap: Buffer.from(bitmap) })) }));
  // From here on a failure loses the VM: the source must not run again, the destination must not go.
  run.did.paused = false;
  run.did.destinationCreated = false;
  run.did.postcopy = true;
  // The discard bitmap goes over the link before the destination may run (an assumption: QEMU sends it as ranges).
  const discardBytes = [...missing.values()].reduce((n, b) => n + b.byteLength, 0);
  await run.elapse(run.link.transmitNs(discardBytes) + run.link.latencyNs);
  const resumed = (await run.on("destination", () => destination.resumeVm({ vm: cfg.destinationVm, snapshot: true }))).vm!;
  const t0 = run.clock.now();
  report.downtimeMs = (t0 - pauseAt) / 1e6;
  try {
    report.postcopy = await runPostcopy(run, resumed, missing, missingPages, t0, preempt);
  } catch (err) {
    const why = err instanceof MigrationError ? err.message : (err as Error).message;
    throw new MigrationError(
      "postcopy-lost",
      `post-copy failed after the switch, and the VM is lost (as in QEMU): ${why}. The destination is missing pages that only the source had, ` +
        `and the source's memory is older than what the destination's guest wrote since; the source stays paused and the destination is kept, its vCPUs waiting on the missing pages (QEMU's postcopy-paused)`,
    );
  }
}

async function runPostcopy(run: MigrationRun, resumed: VmInfo, missing: Map<number, Uint8Array>, missingPages: number, t0: number, preempt: boolean) {
  const { report, cfg, destination, link } = run;
  const dstT0 = Number(resumed.clockNs);
  const toDst = (t: number) => Math.round(dstT0 + (t - t0));
  const fromDst = (d: number) => t0 + (d - dstT0);
  const pageNs = link.transmitNs(NORMAL_PAGE_BYTES);
  const stepNs = Math.round(Math.min(MAX_STEP_NS, Math.max(MIN_STEP_NS, 2 * link.latencyNs + pageNs)));

  // The page requests, as the destination raises them.
  const requests: WatchPageRequestsResponse[] = [];
  let streamError: unknown = null;
  const arrived: { wake: (() => void) | null } = { wake: null };
  // The stream lives as long as the phase, however long that takes on the wall clock: no call deadline (a deadline lost the VM
  // whenever post-copy outlasted --rpc-timeout); a hung destination is caught by the channel's keepalive, an abort by the signal.
  const watch = destination.watchPageRequests({ vm: cfg.destinationVm, fromSequence: 1n }, { signal: run.ep.signal, deadlineMs: Infinity });
  let ended = false;
  const reading = (async () => {
    for await (const r of watch) {
      requests.push(r);
      arrived.wake?.();
    }
  })()
    .catch((e) => (streamError = e))
    .finally(() => {
      ended = true;
      arrived.wake?.();
    });
  /** In the stepped drive: the requests raised by the last step, all of which the stream must have brought before going on. */
  let raised = 0;

  // The guest runs on the destination now.
  run.clock =
    run.clock.drive === "stepped"
      ? new SteppedClock(destination, cfg.destinationVm, {
          startNs: t0,
          maxStepNs: stepNs,
          callDeadlineMs: run.bulk.deadlineMs,
          signal: run.ep.signal,
          watch: run.watch,
          onStep: async (r) => {
            raised = Number(r.pageRequests);
          },
        })
      : new RealtimeClock(resumed.realtimeSpeed || 1, run.watch, t0);
  run.progress("postcopy", { dirtyPages: missingPages, remainingBytes: missingPages * 4096 });

  // What still has to go, in push order, and what has been sent.
  const pending = new Map([...missing].map(([slot, b]) => [slot, new Uint8Array(b)]));
  const order = [...pending.keys()].sort((a, b) => a - b);
  let cursor = { slotIdx: 0, page: 0 };
  const out = { requestedPages: 0, pushedPages: 0, bytes: 0 };
  let linkFreeAt = t0;
  let lastArrival = t0;
  let handled = 0;
  const writesAt = await destinationWrites(run);

  const isPending = (slot: number, p: number) => ((pending.get(slot)![p >>> 3] >> (p & 7)) & 1) === 1;
  const take = (slot: number, p: number) => (pending.get(slot)![p >>> 3] &= ~(1 << (p & 7)));

  /** Reads the requested pages of one slot from the source and lands each on the destination at its time (controller time). */
  const sendRequested = async (slot: number, pages: { page: number; at: number }[]) => {
    pages.sort((a, b) => a.page - b.page);
    const got = await readPages(run, slot, pages.map((x) => x.page));
    await run.on("destination", () =>
      destination.writeMemory(got.map((g, i) => ({ vm: cfg.destinationVm, chunk: { slot, firstPage: BigInt(g.page), numPages: 1, bitmap: Buffer.alloc(0), contents: g.contents, arriveAtNs: BigInt(toDst(pages[i].at)) } })), run.bulk),
    );
    for (const x of pages) lastArrival = Math.max(lastArrival, x.at);
    out.bytes += Link.bytesFor(pages.length, 0);
  };

  /** Reads a pushed batch from the source and lands it all at `at`, in one chunk. */
  const sendPushed = async (slot: number, pages: number[], at: number) => {
    const first = pages[0];
    const { sel, contents } = await readSelection(run, slot, pages);
    await run.on("destination", () =>
      destination.writeMemory([{ vm: cfg.destinationVm, chunk: { slot, firstPage: BigInt(first), numPages: pages[pages.length - 1] - first + 1, bitmap: sel, contents, arriveAtNs: BigInt(toDst(at)) } }], run.bulk),
    );
    lastArrival = Math.max(lastArrival, at);
    out.bytes += Link.bytesFor(pages.length, 0);
  };

  /** The next background batch: up to PUSH_BATCH_PAGES pages still pending, in slot and page order. */
  const nextBatch = (): { slot: number; pages: number[] } | null => {
    while (cursor.slotIdx < order.length) {
      const slot = order[cursor.slotIdx];
      const bm = pending.get(slot)!;
      const pages: number[] = [];
      // A batch also stays within one ReadMemory chunk's reach.
      const limit = Math.min(bm.length * 8, cursor.page + MAX_SPAN_PAGES);
      for (let p = cursor.page; p < limit && pages.length < PUSH_BATCH_PAGES; p++) {
        cursor.page = p + 1;
        if (isPending(slot, p)) pages.push(p);
      }
      if (pages.length) return { slot, pages };
      cursor = { slotIdx: cursor.slotIdx + 1, page: 0 };
    }
    return null;
  };

  let pushing = true;
  for (;;) {
    const now = run.clock.now();
    // Requests first: each one jumps the queue.
    while (run.clock.drive === "stepped" && requests.length < raised && !streamError && !ended) await new Promise<void>((r) => (arrived.wake = r));
    arrived.wake = null;
    if (streamError) throw streamError;
    const bySlot = new Map<number, { page: number; at: number }[]>();
    while (handled < requests.length) {
      const r = requests[handled++].request!;
      const slot = r.slot;
      const p = Number(r.page);
      if (!isPending(slot, p)) continue; // on its way already: the vCPU waits for that copy
      take(slot, p);
      // The request reaches the source one latency after the fault (steps are no longer than a round trip, so its page lands after now).
      const reaches = fromDst(Number(r.atNs)) + link.latencyNs;
      // Without preempt the page goes after the pushed batch already on the wire; either way it takes its share of the link.
      const leaves = preempt ? reaches : Math.max(reaches, linkFreeAt);
      linkFreeAt = Math.max(linkFreeAt, leaves) + pageNs;
      out.requestedPages++;
      if (!bySlot.has(slot)) bySlot.set(slot, []);
      bySlot.get(slot)!.push({ page: p, at: leaves + pageNs + link.latencyNs });
    }
    for (const [slot, pages] of bySlot) await sendRequested(slot, pages);
    // Keep the background push going.
    while (pushing && linkFreeAt <= now + stepNs) {
      const b = nextBatch();
      if (!b) {
        pushing = false;
        break;
      }
      for (const p of b.pages) take(b.slot, p);
      const leaves = Math.max(linkFreeAt, now);
      const done = leaves + link.transmitNs(Link.bytesFor(b.pages.length, 0));
      linkFreeAt = done;
      out.pushedPages += b.pages.length;
      await sendPushed(b.slot, b.pages, done + link.latencyNs);
    }
    if (!pushing && now >= lastArrival) {
      const info = (await run.on("destination", () => destination.getVm({ vm: cfg.destinationVm }))).vm!;
      if (!info.postcopy?.active) {
        await reading;
        const pc = info.postcopy!;
        const g = info.vcpus.reduce((n, v) => n + Number(v.writes), 0);
        const durationNs = now - t0;
        report.rounds.push({
          round: report.rounds.length,
          dirtyPages: missingPages,
          pagesSent: out.requestedPages + out.pushedPages,
          normalPages: out.requestedPages + out.pushedPages,
          zeroPages: 0,
          bytesSent: out.bytes,
          durationMs: durationNs / 1e6,
          syncHostMs: 0,
          etaMs: null,
          dirtyRatePagesPerSecond: 0,
          vcpuDirtyRatesPagesPerSecond: null,
          remainingBytes: missingPages * 4096,
          thresholdBytes: run.thresholdBytes,
          expectedDowntimeMs: 0,
          guestWritesPerSecond: durationNs > 0 ? ((g - writesAt) * 1e9) / durationNs : 0,
          ringFullExits: 0,
          ringStallMs: 0,
          pmlFullExits: 0,
          hdbssFullFaults: 0,
          endedMigration: false,
          stopAndCopy: false,
          postcopy: true,
          fallbackSyncs: 0,
          cpuThrottlePercentage: report.cpuThrottlePercentage,
          dirtyLimitThrottleTimePerRoundUs: report.dirtyLimitThrottleTimePerRoundUs,
          dirtyLimitRingFullTimeUs: report.dirtyLimitRingFullTimeUs,
        });
        report.normalPages += out.requestedPages + out.pushedPages;
        report.transferredBytes += out.bytes;
        return {
          durationMs: durationNs / 1e6,
          missingPages,
          requests: Number(pc.requests),
          requestedPages: out.requestedPages,
          pushedPages: out.pushedPages,
          duplicatePages: Number(pc.duplicatePages),
          bytes: out.bytes,
          blocktimeMs: Number(pc.blocktimeNs) / 1e6,
          vcpuBlocktimeMs: pc.vcpuBlocktimeNs.map((n) => Number(n) / 1e6),
          preempt,
        };
      }
    }
    const next = pushing ? linkFreeAt - stepNs : lastArrival;
    await run.on("destination", () => run.clock.elapse(Math.max(1, Math.min(stepNs, next - now))));
  }
}

/** The destination guest's writes so far. */
async function destinationWrites(run: MigrationRun): Promise<number> {
  const v = (await run.on("destination", () => run.destination.getVm({ vm: run.cfg.destinationVm }))).vm!;
  return v.vcpus.reduce((n, c) => n + Number(c.writes), 0);
}

/** The given pages (ascending) of one slot from the (paused) source: their selection from the first, and their content words in order. */
async function readSelection(run: MigrationRun, slot: number, pages: number[]): Promise<{ sel: Buffer; contents: Buffer }> {
  const first = pages[0];
  const count = pages[pages.length - 1] - first + 1;
  const sel = Buffer.alloc(Math.ceil(count / 8));
  for (const p of pages) sel[(p - first) >>> 3] |= 1 << ((p - first) & 7);
  const parts: Buffer[] = [];
  const stream = run.source.readMemory({ vm: run.cfg.sourceVm, slot, firstPage: BigInt(first), numPages: BigInt(count), bitmap: sel, chunkPages: Math.ceil(count / 8) * 8 }, run.bulk);
  try {
    for await (const r of stream) parts.push(Buffer.from(r.chunk!.contents.buffer, r.chunk!.contents.byteOffset, r.chunk!.contents.byteLength));
  } catch (err) {
    throw new MigrationError("unreachable", `reading pages from the source at ${run.source.address}: ${(err as { details?: string }).details ?? (err as Error).message}`);
  }
  return { sel, contents: Buffer.concat(parts) };
}

/** The given pages (ascending) of one slot, one content word each; one read per span that a ReadMemory chunk can reach. */
async function readPages(run: MigrationRun, slot: number, pages: number[]): Promise<Page[]> {
  const out: Page[] = [];
  for (const span of spans(pages, MAX_SPAN_PAGES)) {
    const { contents } = await readSelection(run, slot, span);
    span.forEach((page, k) => out.push({ page, contents: contents.subarray(8 * k, 8 * k + 8) }));
  }
  return out;
}

/** Ascending pages cut into runs that each cover fewer than `max` pages from their first. */
export function spans(pages: number[], max: number): number[][] {
  const out: number[][] = [];
  for (const p of pages) {
    const last = out.at(-1);
    if (last && p - last[0] < max) last.push(p);
    else out.push([p]);
  }
  return out;
}
