/** The page-tracking device's gRPC API over the model, its metrics, and its ops endpoint. */
import { Counter, Gauge, Histogram, type Registry } from "prom-client";
import { createComponentServer, type ComponentServer } from "../../common/component.js";
import { invalidArgument } from "../../common/errors.js";
import { addService, type ServiceHandlers } from "../../common/grpc.js";
import type { Logger } from "../../common/log.js";
import type { Security } from "../../common/security.js";
import * as messages from "../../proto/gen/dirtytrack/ptdevice/v1/ptdevice.js";
import { PageTrackingDeviceServiceService, TrackingMode } from "../../proto/gen/dirtytrack/ptdevice/v1/ptdevice.js";
import { bytesToGpas, gpasToBytes } from "./client.js";
import type { PageTrackingDevice } from "./model/device.js";

export const DEVICE_PROTO = "dirtytrack/ptdevice/v1/ptdevice.proto";
export const DEVICE_SERVICE = "dirtytrack.ptdevice.v1.PageTrackingDeviceService";

function id(v: bigint, what: string): number {
  if (v === 0n || v > 0xffffffffn) throw invalidArgument(`${what} ${v} is not a tracker id`);
  return Number(v);
}

class DeviceMetrics {
  readonly readSize: Histogram<string>;
  readonly readSeconds: Histogram<string>;
  readonly streamLag: Gauge<string>;
  constructor(registry: Registry, device: PageTrackingDevice) {
    const registers = [registry];
    const perTracker = (name: string, help: string, type: "counter" | "gauge", pick: (t: import("./model/device.js").Tracker) => number) => {
      const Metric = type === "counter" ? Counter : Gauge;
      return new Metric({
        name,
        help,
        labelNames: ["vmid"],
        registers,
        collect(this: Counter | Gauge) {
          this.reset();
          for (const t of device.trackers.values()) (this as Gauge).inc({ vmid: String(t.vmid) }, pick(t));
        },
      });
    };
    new Gauge({
      name: "ptdevice_trackers",
      help: "Trackers allocated (one per VMID).",
      registers,
      collect() {
        this.set(device.trackers.size);
      },
    });
    perTracker("ptdevice_tracking_enabled_cpus", "CPUs with tracking enabled per VMID (-1 references count as every CPU: 1 here).", "gauge", (t) => (t.allCpuRefs > 0 ? 1 : 0) + t.cpuRefs.size);
    perTracker("ptdevice_gpas_observed_total", "GPAs reported by the hypervisor for tracked CPUs.", "counter", (t) => t.observed);
    perTracker("ptdevice_gpas_ignored_total", "GPAs reported for CPUs not being tracked.", "counter", (t) => t.ignored);
    perTracker("ptdevice_gpas_logged_total", "GPAs moved into the dirty log (after de-duplication).", "counter", (t) => t.logged);
    perTracker("ptdevice_buffer_gpas", "Not-yet-logged GPAs in the internal buffers.", "gauge", (t) => t.buffered);
    perTracker("ptdevice_log_gpas", "GPAs in the dirty log, waiting to be read.", "gauge", (t) => t.logLength);
    perTracker("ptdevice_flushes_total", "Flush calls.", "counter", (t) => t.flushes);
    perTracker("ptdevice_log_overflows_total", "Times a dirty log overflowed (the reader then treats the VM as all dirty).", "counter", (t) => t.overflows);
    new Gauge({
      name: "ptdevice_memory_bytes",
      help: "Bytes the trackers' buffers, logs and de-duplicating sets hold.",
      registers,
      collect() {
        this.set(device.allocatedBytes);
      },
    });
    new Counter({
      name: "ptdevice_orphan_trackers_released_total",
      help: "Trackers released because the hypervisor link that allocated them is gone (a restart, a lost device).",
      registers,
      collect() {
        this.reset();
        this.inc(device.orphansReleased);
      },
    });
    this.readSize = new Histogram({
      name: "ptdevice_read_dirty_gpas",
      help: "GPAs returned per ReadDirty call.",
      buckets: [0, 1, 16, 128, 512, 4096, 65536, 1 << 20],
      registers,
    });
    this.readSeconds = new Histogram({
      name: "ptdevice_read_dirty_seconds",
      help: "Time to serve one ReadDirty call.",
      buckets: [1e-5, 1e-4, 1e-3, 0.01, 0.1, 1],
      registers,
    });
    this.streamLag = new Gauge({
      name: "ptdevice_report_stream_lag_batches",
      help: "Batches received on a ReportWrites stream but not yet acknowledged.",
      registers,
    });
  }
}

export function deviceHandlers(device: PageTrackingDevice, metrics: DeviceMetrics): ServiceHandlers<typeof PageTrackingDeviceServiceService> {
  return {
    allocateTracker(req) {
      if (req.mode !== TrackingMode.TRACKING_MODE_DIRTY_PAGES && req.mode !== TrackingMode.TRACKING_MODE_UNSPECIFIED) {
        throw invalidArgument(`allocate_tracker: mode ${req.mode} is not supported (dirty pages only)`, "EINVAL");
      }
      return { tracker: BigInt(device.allocate(req.vmid, req.owner).id) };
    },
    releaseTracker(req) {
      device.release(id(req.tracker, "tracker"));
      return {};
    },
    enableTracking(req) {
      return { references: device.tracker(id(req.tracker, "tracker")).enable(req.cpu) };
    },
    disableTracking(req) {
      return { references: device.tracker(id(req.tracker, "tracker")).disable(req.cpu) };
    },
    flush(req) {
      return { flushed: BigInt(device.tracker(id(req.tracker, "tracker")).flush()) };
    },
    readDirty(req) {
      const t0 = process.hrtime.bigint();
      const r = device.tracker(id(req.tracker, "tracker")).read(req.cpu, req.max);
      const gpas = gpasToBytes(r.gpas);
      metrics.readSize.observe(r.gpas.length);
      metrics.readSeconds.observe(Number(process.hrtime.bigint() - t0) / 1e9);
      return { gpas, count: r.gpas.length, overflowed: r.overflowed, remaining: BigInt(r.remaining) };
    },
    async *reportWrites(reqs) {
      let last = 0n;
      for await (const r of reqs) {
        if (r.seq <= last) throw invalidArgument(`report writes: sequence ${r.seq} after ${last}; sequences must increase`);
        if (r.gpas.byteLength % 8 !== 0) throw invalidArgument(`report writes: ${r.gpas.byteLength} bytes is not a whole number of u64 GPAs`);
        metrics.streamLag.inc();
        device.observe(r.vmid, r.cpu, bytesToGpas(r.gpas));
        last = r.seq;
        metrics.streamLag.dec();
        yield { ackedSeq: last };
      }
    },
  };
}

export interface DeviceServerDeps {
  device: PageTrackingDevice;
  logger: Logger;
  registry?: Registry;
  security?: Security;
}

export type DeviceServer = ComponentServer;

export function createDeviceServer(deps: DeviceServerDeps): DeviceServer {
  const app = createComponentServer({
    registry: deps.registry,
    security: deps.security,
    protoFiles: [DEVICE_PROTO],
    serviceNames: [DEVICE_SERVICE],
    health: () => ({ ok: true, detail: { trackers: deps.device.trackers.size } }),
  });
  const metrics = new DeviceMetrics(app.registry, deps.device);
  addService(app.grpc, PageTrackingDeviceServiceService, deviceHandlers(deps.device, metrics), { metrics: app.rpcMetrics, logger: deps.logger, messages });
  return app;
}
