/**
 * The hypervisor's side of the page-tracking device (the KVM <-> driver split
 * of seed 000, put on the wire). The device registers with its address; VMs
 * that enable the capability get a tracker; the GPAs of writes that complete
 * without a fault (hardware clean -> dirty updates) stream to the device in
 * per-CPU batches with sequence numbers; a sync waits until the device has
 * acknowledged every batch sent before it, flushes, and reads the dirty GPAs.
 *
 * The promise: no dirty page is lost. If the stream breaks or the device stops
 * answering, every page of every device-tracked slot is marked dirty, the VMs
 * fall back to write protection, the capability is dropped, and the event is
 * counted and logged.
 */
import type * as grpc from "@grpc/grpc-js";
import * as grpcjs from "@grpc/grpc-js";
import { DomainError, failedPrecondition } from "../../common/errors.js";
import { kindOfStatus } from "../../common/grpc.js";
import type { Logger } from "../../common/log.js";
import type { ReportWritesRequest, ReportWritesResponse } from "../../proto/gen/dirtytrack/ptdevice/v1/ptdevice.js";
import { TrackingMode } from "../../proto/gen/dirtytrack/ptdevice/v1/ptdevice.js";
import { bytesToGpas, connectDevice, gpasToBytes, type DeviceClient } from "../page-tracking-device/client.js";
import type { ClientOptions, DeepPartial } from "../../common/client.js";
import { deviceLost, disableDeviceMode, enableDeviceMode, markDirtyGpas } from "./model/page-tracking-device.js";
import type { Vm } from "./model/vm.js";

/** KVM reads the device one page of GPAs at a time; the cost model charges per such call. */
export const READ_CHUNK_GPAS = 512;
/** GPAs per wire read: the transport is not the modelled driver interface. */
const WIRE_READ_GPAS = 1 << 16;
/** A CPU's batch is sent once it holds this many GPAs, and after every guest step. */
const BATCH_GPAS = 8192;
/** How long a sync waits for the device before declaring it lost. */
export const DEVICE_TIMEOUT_MS = 3000;

interface Attached {
  vm: Vm;
  tracker: bigint;
  pending: Map<number, number[]>;
  /** Collects what the hardware agent sees into `pending`. */
  sink: (cpu: number, gpa: number) => void;
}

export interface DeviceLinkEvents {
  lost(reason: string, pagesMarked: number): void;
}

export class DeviceLink {
  private readonly client: DeviceClient;
  private stream: grpc.ClientDuplexStream<DeepPartial<ReportWritesRequest>, ReportWritesResponse> | null = null;
  private readonly attached = new Map<string, Attached>();
  private seqSent = 0n;
  private seqAcked = 0n;
  private waiters: { seq: bigint; resolve: () => void }[] = [];
  lost: string | null = null;
  /** Unregistering: the stream's end is expected, not a failure. */
  private closing = false;
  batchesSent = 0;
  gpasSent = 0;

  constructor(
    readonly address: string,
    /** Trackers this link allocates carry it as their owner (see RegisterPageTrackingDeviceResponse). */
    readonly id: string,
    private readonly logger: Logger,
    private readonly events: DeviceLinkEvents,
    clientOptions: ClientOptions = {},
  ) {
    this.client = connectDevice(address, { deadlineMs: DEVICE_TIMEOUT_MS, hangTimeoutMs: DEVICE_TIMEOUT_MS, ...clientOptions });
  }

  /**
   * A device call's failure as the hypervisor's own status, naming the
   * device: an unreachable device is a missing precondition (ENODEV), not an
   * unreachable hypervisor.
   */
  private explain(err: unknown, what: string): DomainError {
    const e = err as Partial<grpcjs.ServiceError>;
    const detail = e.details ?? e.message ?? String(err);
    if (e.code === undefined || [grpcjs.status.UNAVAILABLE, grpcjs.status.DEADLINE_EXCEEDED, grpcjs.status.CANCELLED].includes(e.code)) {
      return failedPrecondition(`${what}: the page-tracking device at ${this.address} did not answer (${detail})`, "ENODEV");
    }
    return new DomainError(kindOfStatus(e.code), `${what}: the page-tracking device at ${this.address} refused: ${detail}`);
  }

  get vmCount(): number {
    return this.attached.size;
  }

  get lagBatches(): number {
    return Number(this.seqSent - this.seqAcked);
  }

  private openStream() {
    if (this.stream) return this.stream;
    // The stream lives as long as the link; keepalive and the acknowledgement timeout watch it.
    const s = this.client.reportWrites({ deadlineMs: Infinity });
    s.on("data", (r: ReportWritesResponse) => {
      this.seqAcked = r.ackedSeq;
      this.waiters = this.waiters.filter((w) => {
        if (w.seq > this.seqAcked) return true;
        w.resolve();
        return false;
      });
    });
    s.on("error", (err: Error) => this.fail(`the ReportWrites stream broke: ${err.message}`));
    s.on("end", () => this.fail("the device ended the ReportWrites stream"));
    this.stream = s;
    return s;
  }

  /** Enables the device for vm (allocate_tracker + enable_tracking(-1)). */
  async attach(vm: Vm): Promise<void> {
    if (this.lost) throw failedPrecondition(`the page-tracking device at ${this.address} was lost: ${this.lost}`, "ENODEV");
    if (this.attached.has(vm.name)) return;
    const what = `ENABLE_CAP(ARM_PAGE_TRACKING_DEVICE) on VM ${vm.name}`;
    const { tracker } = await this.client
      .allocateTracker({ vmid: vm.config.vmid, mode: TrackingMode.TRACKING_MODE_DIRTY_PAGES, owner: this.id })
      .catch((err: unknown) => {
        throw this.explain(err, what);
      });
    try {
      await this.client.enableTracking({ tracker, cpu: -1 });
    } catch (err) {
      await this.client.releaseTracker({ tracker }).catch(() => undefined);
      throw this.explain(err, what);
    }
    this.openStream();
    const a: Attached = {
      vm,
      tracker,
      pending: new Map(),
      sink: (cpu, gpa) => {
        let batch = a.pending.get(cpu);
        if (!batch) a.pending.set(cpu, (batch = []));
        batch.push(gpa);
        if (batch.length >= BATCH_GPAS) this.send(a);
      },
    };
    enableDeviceMode(vm, a.sink);
    this.attached.set(vm.name, a);
  }

  /**
   * Sends every pending batch of one VM (or all). A VM with the injected
   * sync bug holds each CPU's last, partial batch back until its next read is
   * done (force), so that it is still in flight when the device is read; full
   * batches go as usual, so what is held stays bounded.
   */
  send(only?: Attached, force = false): void {
    if (this.lost || !this.stream) return;
    for (const a of only ? [only] : this.attached.values()) {
      const holdPartial = a.vm.injected.skipDeviceSyncWait && !force;
      for (const [cpu, gpas] of a.pending) {
        if (gpas.length === 0 || (holdPartial && gpas.length < BATCH_GPAS)) continue;
        this.stream.write({ vmid: a.vm.config.vmid, cpu, seq: ++this.seqSent, gpas: gpasToBytes(gpas) });
        this.batchesSent++;
        this.gpasSent += gpas.length;
        a.pending.set(cpu, []);
      }
    }
  }

  /** Resolves once the device acknowledged everything sent so far (a's batches included, even held back). */
  private async drained(a?: Attached): Promise<void> {
    this.send();
    if (a) this.send(a, true);
    const seq = this.seqSent;
    if (seq <= this.seqAcked) return;
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no acknowledgement of batch ${seq} within ${DEVICE_TIMEOUT_MS} ms`)), DEVICE_TIMEOUT_MS);
      this.waiters.push({
        seq,
        resolve: () => {
          clearTimeout(timer);
          resolve();
        },
      });
    });
  }

  /** Flushes the tracker and reads every logged GPA into the VM's bitmaps. Returns pages and modelled host ns. */
  private async readAll(a: Attached): Promise<{ pages: number; hostNs: number }> {
    await this.client.flush({ tracker: a.tracker });
    let pages = 0;
    let gpas = 0;
    for (;;) {
      const r = await this.client.readDirty({ tracker: a.tracker, cpu: -1, max: WIRE_READ_GPAS });
      if (r.overflowed) {
        // GPAs were dropped: everything the device tracks is dirty; tracking goes on.
        pages += deviceLost(a.vm);
        enableDeviceMode(a.vm, a.sink);
      }
      if (r.count === 0) break;
      gpas += r.count;
      pages += markDirtyGpas(a.vm, bytesToGpas(r.gpas));
    }
    const c = a.vm.costs;
    return { pages, hostNs: Math.max(1, Math.ceil(gpas / READ_CHUNK_GPAS)) * c.deviceReadCallNs + gpas * c.deviceReadGpaNs };
  }

  /**
   * kvm_arch_sync_dirty_log with the device: every write reported before now
   * is acknowledged, the device flushed, its GPAs marked. If the device
   * fails, everything is marked dirty instead; the sync itself never fails.
   */
  async sync(vm: Vm): Promise<{ pages: number; hostNs: number }> {
    const a = this.attached.get(vm.name);
    if (!a) return { pages: 0, hostNs: 0 };
    try {
      if (vm.injected.skipDeviceSyncWait) {
        // The injected bug: the read does not wait for the last sequence number, so the last
        // batches, still in flight, reach the device after it was read and this GET misses them.
        const r = await this.readAll(a);
        this.send(a, true);
        return r;
      }
      await this.drained(a);
      return await this.readAll(a);
    } catch (err) {
      return { pages: this.fail(`sync of VM ${vm.name} failed: ${(err as Error).message}`), hostNs: 0 };
    }
  }

  /**
   * Disables the device for vm: disable_tracking, then (only when it returned
   * 0) flush and a last read so that the final pages are not lost, then
   * release_tracker. The VM goes back to write protection.
   */
  async detach(vm: Vm): Promise<void> {
    const a = this.attached.get(vm.name);
    if (!a) return;
    try {
      await this.drained(a);
      await this.client.disableTracking({ tracker: a.tracker, cpu: -1 });
      await this.readAll(a);
      await this.client.releaseTracker({ tracker: a.tracker });
      this.attached.delete(vm.name);
      disableDeviceMode(vm);
    } catch (err) {
      this.fail(`disabling the device for VM ${vm.name} failed: ${(err as Error).message}`);
    }
  }

  /** The device is gone: every tracked page dirty, write protection back, capability dropped. Returns pages marked. */
  fail(reason: string): number {
    if (this.lost || (this.closing && this.attached.size === 0)) return 0;
    this.lost = reason;
    let pages = 0;
    for (const a of this.attached.values()) pages += deviceLost(a.vm);
    this.attached.clear();
    for (const w of this.waiters) w.resolve();
    this.waiters = [];
    this.stream?.cancel();
    this.stream = null;
    this.client.close();
    this.logger.error({ device: this.address, reason, pagesMarkedDirty: pages }, "page-tracking device lost; every tracked page marked dirty");
    this.events.lost(reason, pages);
    return pages;
  }

  /** Unregistration: detaches every VM cleanly, then closes. */
  async close(): Promise<void> {
    this.closing = true;
    for (const a of [...this.attached.values()]) await this.detach(a.vm);
    this.stream?.end();
    this.stream = null;
    this.client.close();
  }

  /** True when vm's dirty state comes from this device. */
  owns(vm: Vm): boolean {
    return this.attached.has(vm.name);
  }
}
