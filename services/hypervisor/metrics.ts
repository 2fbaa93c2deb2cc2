/**
 * Hypervisor metrics. Hot-path counters live in the model as plain numbers;
 * these families read them at scrape time, so a guest write costs nothing
 * extra. Labels are bounded: vm, vcpu, slot, interface; never a GPA.
 */
import { Counter, Gauge, Histogram, type Registry } from "prom-client";
import type { Hypervisor } from "./model/hypervisor.js";
import type { Vcpu } from "./model/vcpu.js";
import type { Vm } from "./model/vm.js";

/** The interfaces the sync histogram is labelled with. */
export const SYNC_INTERFACES = ["get", "clear", "ring_reset", "dbm_scan", "device_read"] as const;

export class HypervisorMetrics {
  readonly syncHostSeconds: Histogram<"vm" | "interface">;
  readonly ringHarvested: Counter<"vm">;
  readonly memoryCopiedPages: Counter<"vm" | "direction">;
  readonly deviceLost: Counter<string>;
  readonly ringResetEntries: Counter<"vm">;
  private readonly syncDirtyRate: Gauge<"vm" | "slot" | "mechanism">;
  /** The dirty-rate series each VM has set, so that they go with it. */
  private readonly rateSeries = new Map<string, Map<string, { vm: string; slot: string; mechanism: string }>>();
  private device: () => { lagBatches: number; batchesSent: number; gpasSent: number; vmCount: number } | null = () => null;

  /** Lets the device-link families read the registered link at scrape time. */
  watchDevice(get: () => { lagBatches: number; batchesSent: number; gpasSent: number; vmCount: number } | null): void {
    this.device = get;
  }

  constructor(registry: Registry, hv: Hypervisor) {
    const registers = [registry];
    new Gauge({
      name: "hypervisor_vms",
      help: "VMs on this hypervisor.",
      registers,
      collect() {
        this.set(hv.vms.size);
      },
    });
    new Gauge({
      name: "hypervisor_memory_budget_bytes",
      help: "Bytes this hypervisor may allocate for its VMs' state (HYPERVISOR_MEMORY_BUDGET).",
      registers,
      // VM workers (shards.ts) share one budget: each reports it, the process has it once.
      aggregator: "max",
      collect() {
        this.set(hv.options.memoryBudgetBytes);
      },
    });
    new Gauge({
      name: "hypervisor_memory_allocated_bytes",
      help: "Bytes the VMs' state holds now (pages, logs, TLBs, rings, hardware logs), counted against the budget.",
      registers,
      collect() {
        this.set(hv.memoryInUse);
      },
    });
    new Gauge({
      name: "hypervisor_guest_memory_bytes",
      help: "Guest memory of each VM (sum of its memslots).",
      labelNames: ["vm"],
      registers,
      collect() {
        this.reset();
        for (const vm of hv.vms.values()) this.set({ vm: vm.name }, vm.memoryBytes);
      },
    });
    new Gauge({
      name: "hypervisor_vm_clock_seconds",
      help: "Virtual clock of each VM (guest time since creation).",
      labelNames: ["vm"],
      registers,
      collect() {
        this.reset();
        for (const vm of hv.vms.values()) this.set({ vm: vm.name }, vm.clockNs / 1e9);
      },
    });
    const perVcpu = (name: string, help: string, pick: (t: { writes: number; writeFaults: number; overheadNs: number; throttleNs: number; dirtyLimitNs: number }) => number) =>
      new Counter({
        name,
        help,
        labelNames: ["vm", "vcpu"],
        registers,
        collect() {
          this.reset();
          for (const vm of hv.vms.values()) for (const v of vm.vcpus) this.inc({ vm: vm.name, vcpu: String(v.index) }, pick(v.total));
        },
      });
    perVcpu("hypervisor_guest_writes_total", "Guest writes completed by each vCPU.", (t) => t.writes);
    new Counter({
      name: "hypervisor_vcpu_pages_dirtied_total",
      help: "Pages each vCPU dirtied while logging (newly logged by a fault, or made dirty by hardware); rate() is its dirty rate in pages/s.",
      labelNames: ["vm", "vcpu", "mechanism"],
      registers,
      collect() {
        this.reset();
        for (const vm of hv.vms.values()) for (const v of vm.vcpus) this.inc({ vm: vm.name, vcpu: String(v.index), mechanism: vm.mechanism }, v.total.pagesDirtied);
      },
    });
    perVcpu("hypervisor_write_faults_total", "Stage-2 write faults (translation and permission) taken by each vCPU.", (t) => t.writeFaults);
    perVcpu(
      "hypervisor_vcpu_tracking_overhead_seconds_total",
      "Guest time each vCPU lost to faults in slots that are logging dirty pages.",
      (t) => t.overheadNs / 1e9,
    );
    perVcpu("hypervisor_vcpu_throttle_seconds_total", "Guest time each vCPU slept under QEMU's vCPU throttle (auto-converge).", (t) => t.throttleNs / 1e9);
    new Gauge({
      name: "hypervisor_vcpu_cpu_throttle_percentage",
      help: "QEMU's cpu-throttle-percentage of each throttled vCPU.",
      labelNames: ["vm", "vcpu"],
      registers,
      collect() {
        this.reset();
        for (const vm of hv.vms.values()) for (const v of vm.vcpus) if (v.throttle) this.set({ vm: vm.name, vcpu: String(v.index) }, v.throttle.percentage);
      },
    });
    new Gauge({
      name: "hypervisor_dirty_rate_mebibytes_per_second",
      help: "Each VM's last calc-dirty-rate (QEMU's dirty-rate, MiB/s), by mode.",
      labelNames: ["vm", "mode"],
      registers,
      collect() {
        this.reset();
        for (const vm of hv.vms.values()) if (vm.dirtyRate?.status === "measured") this.set({ vm: vm.name, mode: vm.dirtyRate.mode }, vm.dirtyRate.dirtyRateMiBps);
      },
    });
    new Gauge({
      name: "hypervisor_vcpu_dirty_rate_mebibytes_per_second",
      help: "Each vCPU's rate in its VM's last calc-dirty-rate in dirty-ring mode (MiB/s).",
      labelNames: ["vm", "vcpu"],
      registers,
      collect() {
        this.reset();
        for (const vm of hv.vms.values()) vm.dirtyRate?.vcpuDirtyRateMiBps.forEach((r, i) => this.set({ vm: vm.name, vcpu: String(i) }, r));
      },
    });
    perVcpu("hypervisor_vcpu_dirty_limit_sleep_seconds_total", "Guest time each vCPU slept under QEMU's dirty limit (after full rings).", (t) => t.dirtyLimitNs / 1e9);
    const perLimited = (name: string, help: string, pick: (l: { quotaMBps: number; currentMBps: number; throttleUsPerFull: number }) => number) =>
      new Gauge({
        name,
        help,
        labelNames: ["vm", "vcpu"],
        registers,
        collect() {
          this.reset();
          for (const vm of hv.vms.values()) for (const v of vm.vcpus) if (v.dirtyLimit) this.set({ vm: vm.name, vcpu: String(v.index) }, pick(v.dirtyLimit));
        },
      });
    // QEMU's "MB" here is MiB (qemu_target_pages_to_MiB); exported in base units.
    perLimited("hypervisor_vcpu_dirty_limit_bytes_per_second", "QEMU's dirty limit (limit-rate, MB/s x 2^20) of each limited vCPU.", (l) => l.quotaMBps * 2 ** 20);
    perLimited("hypervisor_vcpu_dirty_limit_current_bytes_per_second", "Each limited vCPU's dirty rate as the dirty limit last measured it (current-rate, MB/s x 2^20).", (l) => l.currentMBps * 2 ** 20);
    perLimited("hypervisor_vcpu_dirty_limit_throttle_seconds_per_full", "What each limited vCPU sleeps after each full dirty ring (throttle_us_per_full).", (l) => l.throttleUsPerFull / 1e6);
    new Counter({
      name: "hypervisor_pages_dirtied_total",
      help: "Pages whose dirty-log bit went from clear to set (rate() of this is the dirty rate in pages/s).",
      labelNames: ["vm", "slot", "mechanism"],
      registers,
      collect() {
        this.reset();
        for (const vm of hv.vms.values()) {
          for (const s of vm.slots.values()) this.inc({ vm: vm.name, slot: String(s.id), mechanism: vm.mechanism }, s.pagesDirtied);
        }
      },
    });
    new Counter({
      name: "hypervisor_tlb_flushes_total",
      help: "VMID-wide TLB invalidations.",
      labelNames: ["vm"],
      registers,
      collect() {
        this.reset();
        for (const vm of hv.vms.values()) this.inc({ vm: vm.name }, vm.tlbFlushes);
      },
    });
    /** A per-vCPU counter of the VMs that have some feature (a ring, an assist). */
    const perVcpuOf = (name: string, help: string, has: (vm: Vm) => boolean, pick: (v: Vcpu) => number) =>
      new Counter({
        name,
        help,
        labelNames: ["vm", "vcpu"],
        registers,
        collect() {
          this.reset();
          for (const vm of hv.vms.values()) {
            if (!has(vm)) continue;
            for (const v of vm.vcpus) this.inc({ vm: vm.name, vcpu: String(v.index) }, pick(v));
          }
        },
      });
    const perVcpuRing = (name: string, help: string, pick: (v: Vcpu) => number) => perVcpuOf(name, help, (vm) => vm.ringEnabled, pick);
    perVcpuOf(
      "hypervisor_hdbss_full_faults_total",
      "FEAT_HDBSS permission faults of each vCPU whose buffer was full (KVM flushed it and resumed).",
      (vm) => vm.hwDirty === "hdbss",
      (v) => v.total.hdbssFullFaults,
    );
    perVcpuOf(
      "hypervisor_pml_full_exits_total",
      "Intel PML-full exits of each vCPU (KVM drained the 512-entry buffer into the dirty log and re-entered).",
      (vm) => vm.hwDirty === "pml",
      (v) => v.total.pmlFullExits,
    );
    perVcpuRing("hypervisor_dirty_ring_pushes_total", "Entries KVM pushed to each vCPU's dirty ring.", (v) => v.ring!.pushed);
    perVcpuRing("hypervisor_dirty_ring_full_exits_total", "KVM_EXIT_DIRTY_RING_FULL exits of each vCPU.", (v) => v.total.ringFullExits);
    perVcpuRing("hypervisor_dirty_ring_stall_seconds_total", "Guest time each vCPU spent out of the guest on a full ring.", (v) => v.total.ringStallNs / 1e9);
    this.memoryCopiedPages = new Counter({
      name: "hypervisor_memory_copied_pages_total",
      help: "Guest pages copied out by ReadMemory (direction=read) and in by WriteMemory (direction=write).",
      labelNames: ["vm", "direction"],
      registers,
    });
    this.ringHarvested = new Counter({
      name: "hypervisor_dirty_ring_harvested_entries_total",
      help: "Dirty-ring entries collected through HarvestDirtyRing.",
      labelNames: ["vm"],
      registers,
    });
    new Counter({
      name: "hypervisor_write_track_events_total",
      help: "track_write and track_remove_region events delivered to write-tracking notifiers.",
      labelNames: ["vm"],
      registers,
      collect() {
        this.reset();
        for (const vm of hv.vms.values()) this.inc({ vm: vm.name }, vm.writeTrack.events);
      },
    });
    new Counter({
      name: "hypervisor_write_track_dropped_subscribers_total",
      help: "Write-tracking subscribers disconnected for falling too far behind.",
      labelNames: ["vm"],
      registers,
      collect() {
        this.reset();
        for (const vm of hv.vms.values()) this.inc({ vm: vm.name }, vm.writeTrack.droppedSubscribers);
      },
    });
    new Counter({
      name: "hypervisor_hardware_dirty_updates_total",
      help: "Clean -> dirty descriptor updates done by hardware (DBM), without a fault.",
      labelNames: ["vm"],
      registers,
      collect() {
        this.reset();
        for (const vm of hv.vms.values()) this.inc({ vm: vm.name }, vm.hwDirtyUpdates);
      },
    });
    this.deviceLost = new Counter({
      name: "hypervisor_page_tracking_device_lost_total",
      help: "Times the page-tracking device failed and every tracked page was marked dirty.",
      registers,
    });
    const self = this;
    new Gauge({
      name: "hypervisor_page_tracking_device_registered",
      help: "1 while a page-tracking device is registered (ARM_PAGE_TRACKING_DEVICE available).",
      registers,
      aggregator: "max",
      collect() {
        this.set(hv.deviceRegistered ? 1 : 0);
      },
    });
    new Gauge({
      name: "hypervisor_page_tracking_device_stream_lag_batches",
      help: "Write batches sent to the device and not yet acknowledged.",
      registers,
      collect() {
        this.set(self.device()?.lagBatches ?? 0);
      },
    });
    new Counter({
      name: "hypervisor_page_tracking_device_gpas_sent_total",
      help: "GPAs of fault-free writes streamed to the page-tracking device.",
      registers,
      collect() {
        this.reset();
        this.inc(self.device()?.gpasSent ?? 0);
      },
    });
    this.ringResetEntries = new Counter({
      name: "hypervisor_dirty_ring_reset_entries_total",
      help: "Dirty-ring entries freed by KVM_RESET_DIRTY_RINGS.",
      labelNames: ["vm"],
      registers,
    });
    this.syncDirtyRate = new Gauge({
      name: "hypervisor_sync_dirty_rate_pages_per_second",
      help: "QEMU-style dirty rate computed at each GET_DIRTY_LOG: pages found dirty over the guest time since the slot's previous GET.",
      labelNames: ["vm", "slot", "mechanism"],
      registers,
    });
    this.syncHostSeconds = new Histogram({
      name: "hypervisor_dirty_log_sync_host_seconds",
      help: "Simulated host time of each dirty-log sync call, by interface (get, clear, ring_reset, dbm_scan, device_read).",
      labelNames: ["vm", "interface"],
      buckets: [1e-6, 1e-5, 1e-4, 1e-3, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5],
      registers,
    });
  }

  setSyncDirtyRate(vm: string, slot: number, mechanism: string, rate: number): void {
    const labels = { vm, slot: String(slot), mechanism };
    let series = this.rateSeries.get(vm);
    if (!series) this.rateSeries.set(vm, (series = new Map()));
    series.set(`${slot}/${mechanism}`, labels);
    this.syncDirtyRate.set(labels, rate);
  }

  /** A destroyed VM's series go with it (those computed at scrape time vanish by themselves). */
  forgetVm(vm: string): void {
    for (const labels of this.rateSeries.get(vm)?.values() ?? []) this.syncDirtyRate.remove(labels);
    this.rateSeries.delete(vm);
    for (const iface of SYNC_INTERFACES) this.syncHostSeconds.remove({ vm, interface: iface });
    this.ringHarvested.remove({ vm });
    this.ringResetEntries.remove({ vm });
    for (const direction of ["read", "write"]) this.memoryCopiedPages.remove({ vm, direction });
  }
}
