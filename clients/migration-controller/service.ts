/**
 * The migration controller as a long-lived service: it keeps a demo VM
 * running on one of two hypervisors (real-time clock drive) and migrates it
 * back and forth with the chosen mechanism, publishing every migration's
 * progress and outcome as Prometheus metrics (for the dashboards), with
 * /metrics and /healthz on its ops port.
 */
import { Counter, Gauge, Histogram, Registry } from "prom-client";
import { GrpcClientMetrics, type ClientOptions } from "../../common/client.js";
import { createComponentServer, type ComponentServer, type ListenOptions } from "../../common/component.js";
import { addService } from "../../common/grpc.js";
import type { Logger } from "../../common/log.js";
import * as messages from "../../proto/gen/dirtytrack/controller/v1/controller.js";
import { MigrationControllerServiceService } from "../../proto/gen/dirtytrack/controller/v1/controller.js";
import type { CostModel } from "../../services/hypervisor/model/cost-model.js";
import { CONTROLLER_PROTO, CONTROLLER_SERVICE, controllerHandlers } from "./predict/grpc.js";
import { Capability, ClockDrive, WorkloadPattern } from "../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { connectHypervisor, type HypervisorClient } from "../../services/hypervisor/client.js";
import { migrate, MigrationError, type MigrationConfig, type ProgressEvent } from "./migrate.js";
import { guestMemslots, ipaBitsFor } from "./guest.js";
import { parseMechanism } from "./trackers/index.js";

export interface ServiceConfig {
  hypervisors: [string, string];
  vm: string;
  memoryBytes: number;
  vcpus: number;
  writesPerSecond: number;
  hotFraction: number;
  realtimeSpeed: number;
  /** Wall-clock pause between migrations. */
  pauseMs: number;
  policy: Omit<MigrationConfig, "sourceVm" | "destinationVm">;
  /** Security and timeouts of the clients of both hypervisors; its security also guards this service's own gRPC port. */
  clientOptions?: ClientOptions;
  /** What PredictMigration prices tracking with (HYPERVISOR_COST_MODEL's, as the hypervisors'). */
  costs: CostModel;
}

const RESULT: Record<string, string> = {
  "not-converged": "not_converged",
  verification: "verification_failed",
  "postcopy-lost": "postcopy_lost",
};

export class MigrationMetrics {
  readonly migrations: Counter<"result" | "mechanism">;
  readonly round: Gauge<"vm">;
  readonly remaining: Gauge<"vm">;
  readonly transferred: Counter<"vm">;
  readonly dirtyRate: Gauge<"vm">;
  readonly throttle: Gauge<"vm">;
  readonly dirtyLimit: Gauge<"vm">;
  readonly expectedDowntime: Gauge<"vm">;
  readonly eta: Gauge<"vm">;
  readonly downtimeLimit: Gauge<"vm">;
  readonly lastDowntime: Gauge<"vm">;
  readonly inProgress: Gauge<"vm">;
  readonly postcopyActive: Gauge<"vm">;
  readonly postcopyRequests: Counter<"vm">;
  readonly postcopyBlocktime: Counter<"vm">;
  readonly downtime: Histogram<"mechanism">;
  readonly totalTime: Histogram<"mechanism">;

  constructor(registry: Registry) {
    const registers = [registry];
    this.migrations = new Counter({ name: "migration_migrations_total", help: "Migrations finished, by result (completed, failed, not_converged, verification_failed, postcopy_lost).", labelNames: ["result", "mechanism"], registers });
    this.postcopyActive = new Gauge({ name: "migration_postcopy_active", help: "1 while the current migration is in post-copy (QEMU's status postcopy-active).", labelNames: ["vm"], registers });
    this.postcopyRequests = new Counter({ name: "migration_postcopy_requests_total", help: "Page requests the destination's vCPUs raised in post-copy (QEMU's postcopy-requests).", labelNames: ["vm"], registers });
    this.postcopyBlocktime = new Counter({ name: "migration_postcopy_blocktime_seconds_total", help: "Guest time every destination vCPU waited for a page at once in post-copy (QEMU's postcopy-blocktime).", labelNames: ["vm"], registers });
    this.round = new Gauge({ name: "migration_round", help: "Dirty-state syncs so far in the current migration (QEMU's dirty-sync-count).", labelNames: ["vm"], registers });
    this.remaining = new Gauge({ name: "migration_remaining_bytes", help: "Bytes still dirty at the last sync of the current migration.", labelNames: ["vm"], registers });
    this.transferred = new Counter({ name: "migration_transferred_bytes_total", help: "Bytes sent on the migration link.", labelNames: ["vm"], registers });
    this.dirtyRate = new Gauge({ name: "migration_dirty_rate_pages_per_second", help: "Dirty rate computed at the last sync (QEMU's dirty-pages-rate), in pages per second.", labelNames: ["vm"], registers });
    this.throttle = new Gauge({ name: "migration_cpu_throttle_percentage", help: "Auto-converge's vCPU throttle on the source (QEMU's cpu-throttle-percentage).", labelNames: ["vm"], registers });
    this.dirtyLimit = new Gauge({ name: "migration_vcpu_dirty_limit_bytes_per_second", help: "Dirty-limit's per-vCPU limit in service on the source (QEMU's vcpu-dirty-limit in MB/s x 2^20; 0: none).", labelNames: ["vm"], registers });
    this.eta = new Gauge({
      name: "migration_estimated_completion_seconds",
      help: "Guest time the current migration still needs, estimated at its last sync from the dirty rate and the bandwidth (absent: not converging at that rate).",
      labelNames: ["vm"],
      registers,
    });
    this.expectedDowntime = new Gauge({ name: "migration_expected_downtime_seconds", help: "Dirty bytes at the last sync divided by the bandwidth.", labelNames: ["vm"], registers });
    this.downtimeLimit = new Gauge({ name: "migration_downtime_limit_seconds", help: "The downtime limit the switchover rule uses.", labelNames: ["vm"], registers });
    this.lastDowntime = new Gauge({ name: "migration_last_downtime_seconds", help: "Downtime of the VM's last completed migration (guest time from pausing the source to resuming the destination).", labelNames: ["vm"], registers });
    this.inProgress = new Gauge({ name: "migration_in_progress", help: "1 while a migration of the VM runs.", labelNames: ["vm"], registers });
    this.downtime = new Histogram({
      name: "migration_downtime_seconds",
      help: "Downtime of completed migrations (guest time from pausing the source to resuming the destination).",
      labelNames: ["mechanism"],
      buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5, 10, 30],
      registers,
    });
    this.totalTime = new Histogram({
      name: "migration_total_time_seconds",
      help: "Total guest time of finished migrations.",
      labelNames: ["mechanism"],
      buckets: [0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600],
      registers,
    });
  }
}

export class MigrationService {
  readonly registry = new Registry();
  readonly metrics: MigrationMetrics;
  private readonly clients: [HypervisorClient, HypervisorClient];
  private stopped = false;
  /** Interrupts the migration in flight when the service stops: it cleans up instead of leaving a VM paused. */
  private readonly abort = new AbortController();
  private loop: Promise<void> | null = null;
  private readonly server: ComponentServer;
  completed = 0;
  failed = 0;

  constructor(
    private readonly cfg: ServiceConfig,
    private readonly logger: Logger,
  ) {
    this.server = createComponentServer({
      registry: this.registry,
      security: cfg.clientOptions?.security,
      protoFiles: [CONTROLLER_PROTO],
      serviceNames: [CONTROLLER_SERVICE],
      health: () => ({ ok: !this.stopped, detail: { completed: this.completed, failed: this.failed } }),
    });
    addService(this.server.grpc, MigrationControllerServiceService, controllerHandlers(cfg.costs), { metrics: this.server.rpcMetrics, logger, messages });
    this.metrics = new MigrationMetrics(this.registry);
    const rpc = new GrpcClientMetrics(this.registry);
    const opts = { ...cfg.clientOptions, metrics: rpc };
    this.clients = [connectHypervisor(cfg.hypervisors[0], opts), connectHypervisor(cfg.hypervisors[1], opts)];
  }

  /** Binds the gRPC port (PredictMigration, health, reflection) and the ops port (/metrics, /healthz). */
  listen(opts: ListenOptions): Promise<{ grpcPort: number; httpPort: number }> {
    return this.server.listen(opts);
  }

  start(): void {
    this.loop = this.run();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.abort.abort("SIGTERM");
    await this.loop?.catch(() => undefined);
    for (const c of this.clients) c.close();
    await this.server.close();
  }

  /** Which side runs the VM now: the one where it exists unpaused (a leftover paused copy is removed). */
  private async locate(): Promise<number> {
    const found = await Promise.all(this.clients.map((c) => c.getVm({ vm: this.cfg.vm }).then((r) => r.vm!, () => null)));
    const running = found.findIndex((v) => v && v.vcpus.some((x) => !x.paused));
    for (let i = 0; i < 2; i++) if (found[i] && i !== running) await this.clients[i].destroyVm({ vm: this.cfg.vm });
    if (running >= 0) return running;
    await this.clients[0].createVm({
      vm: this.cfg.vm,
      vcpus: this.cfg.vcpus,
      clock: ClockDrive.CLOCK_DRIVE_REALTIME,
      realtimeSpeed: this.cfg.realtimeSpeed,
      ipaBits: ipaBitsFor(this.cfg.memoryBytes),
      memslots: guestMemslots(this.cfg.memoryBytes),
      dirtyRing:
        parseMechanism(this.cfg.policy.mechanism).log === "ring" ? { capability: Capability.CAPABILITY_DIRTY_LOG_RING_ACQ_REL, bytes: 65536n, withBitmap: true } : undefined,
      // First one pass over all of its memory in about a second of guest time, as a booted guest would have touched it.
      workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_SEQUENTIAL, writesPerSecond: Math.ceil(this.cfg.memoryBytes / 4096 / this.cfg.vcpus) },
    });
    await new Promise((r) => setTimeout(r, 1200 / this.cfg.realtimeSpeed));
    await this.clients[0].setWorkload({
      vm: this.cfg.vm,
      workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_HOT_COLD, writesPerSecond: this.cfg.writesPerSecond, hotFraction: this.cfg.hotFraction },
    });
    this.logger.info({ vm: this.cfg.vm, hypervisor: this.cfg.hypervisors[0] }, "created the demo VM");
    return 0;
  }

  private onProgress(e: ProgressEvent, sent: { bytes: number }): void {
    const vm = this.cfg.vm;
    this.metrics.round.set({ vm }, e.round);
    this.metrics.throttle.set({ vm }, e.cpuThrottlePercentage);
    this.metrics.dirtyLimit.set({ vm }, e.dirtyLimitMBps * 2 ** 20);
    this.metrics.postcopyActive.set({ vm }, e.phase === "postcopy" ? 1 : 0);
    if (e.phase === "round") {
      this.metrics.remaining.set({ vm }, e.remainingBytes);
      this.metrics.dirtyRate.set({ vm }, e.dirtyRatePagesPerSecond);
      this.metrics.expectedDowntime.set({ vm }, e.expectedDowntimeMs / 1e3);
      if (e.etaMs === null || e.etaMs === undefined) this.metrics.eta.remove({ vm });
      else this.metrics.eta.set({ vm }, e.etaMs / 1e3);
    }
    if (e.transferredBytes > sent.bytes) {
      this.metrics.transferred.inc({ vm }, e.transferredBytes - sent.bytes);
      sent.bytes = e.transferredBytes;
    }
  }

  /** One migration from wherever the VM runs to the other hypervisor. */
  async migrateOnce(): Promise<void> {
    const from = await this.locate();
    const to = 1 - from;
    const vm = this.cfg.vm;
    const mechanism = this.cfg.policy.mechanism;
    this.metrics.inProgress.set({ vm }, 1);
    this.metrics.downtimeLimit.set({ vm }, this.cfg.policy.downtimeLimitMs / 1e3);
    const sent = { bytes: 0 };
    try {
      const r = await migrate(
        { ...this.cfg.policy, sourceVm: vm, destinationVm: vm },
        { source: this.clients[from], destination: this.clients[to], onProgress: (e) => this.onProgress(e, sent), signal: this.abort.signal },
      );
      this.onProgress({ phase: "done", round: r.dirtySyncCount, dirtyPages: 0, remainingBytes: 0, dirtyRatePagesPerSecond: r.dirtyRatePagesPerSecond, expectedDowntimeMs: 0, elapsedMs: r.totalTimeMs, transferredBytes: r.transferredBytes, cpuThrottlePercentage: 0, dirtyLimitMBps: 0 }, sent);
      this.metrics.migrations.inc({ result: "completed", mechanism });
      this.metrics.downtime.observe({ mechanism }, (r.downtimeMs ?? 0) / 1e3);
      this.metrics.lastDowntime.set({ vm }, (r.downtimeMs ?? 0) / 1e3);
      this.metrics.totalTime.observe({ mechanism }, r.totalTimeMs / 1e3);
      if (r.postcopy) {
        this.metrics.postcopyRequests.inc({ vm }, r.postcopy.requests);
        this.metrics.postcopyBlocktime.inc({ vm }, r.postcopy.blocktimeMs / 1e3);
      }
      // QEMU leaves the source paused after a migration; management removes it.
      await this.clients[from].destroyVm({ vm });
      this.completed++;
      this.logger.info({ from: this.cfg.hypervisors[from], to: this.cfg.hypervisors[to], downtimeMs: r.downtimeMs, rounds: r.dirtySyncCount }, "migrated");
    } catch (err) {
      const kind = err instanceof MigrationError ? err.kind : "failed";
      this.metrics.migrations.inc({ result: RESULT[kind] ?? "failed", mechanism });
      this.failed++;
      if (kind === "postcopy-lost") this.logger.error({ reason: (err as Error).message }, "migration failed after the post-copy switch: the VM is lost");
      else this.logger.warn({ reason: (err as Error).message }, "migration failed; the source keeps running");
    } finally {
      this.metrics.inProgress.set({ vm }, 0);
    }
  }

  private async run(): Promise<void> {
    while (!this.stopped) {
      try {
        await this.migrateOnce();
      } catch (err) {
        this.logger.warn({ reason: (err as Error).message }, "cannot reach the hypervisors yet");
      }
      const until = Date.now() + this.cfg.pauseMs;
      while (!this.stopped && Date.now() < until) await new Promise((r) => setTimeout(r, Math.min(200, this.cfg.pauseMs)));
    }
  }
}
