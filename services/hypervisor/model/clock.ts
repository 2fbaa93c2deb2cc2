/**
 * The real-time clock drive: VMs whose clock is REALTIME advance by the wall
 * time since their last tick times their speed factor. (STEPPED VMs move only
 * on AdvanceVm.) A tick never advances a VM by more than maxTickMs of wall
 * time, so a stalled event loop costs the guest time rather than a burst,
 * and runs guests for at most sliceMs of wall time per tick, so that RPCs
 * always get the event loop between ticks.
 */
import type { Vm } from "./vm.js";

export class RealtimeDriver {
  private timer: NodeJS.Timeout | null = null;
  /** Wall time the driver dropped because ticks came late. */
  droppedMs = 0;

  constructor(
    private readonly vms: () => Iterable<Vm>,
    private readonly tickMs = 20,
    /** Wall time one tick may spend running guests, shared by the VMs; what does not fit is dropped. */
    private readonly sliceMs = 10,
    private readonly maxTickMs = 200,
    private readonly now = () => performance.now(),
  ) {}

  start(): void {
    if (this.timer) return;
    this.timer = setInterval(() => this.tick(), this.tickMs);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }

  tick(): void {
    const now = this.now();
    const vms = [...this.vms()].filter((vm) => vm.config.clock === "realtime");
    const budget = this.sliceMs / Math.max(1, vms.length);
    for (const vm of vms) {
      if (vm.wallRefMs === 0) {
        vm.wallRefMs = now;
        continue;
      }
      let wall = now - vm.wallRefMs;
      vm.wallRefMs = now;
      if (wall > this.maxTickMs) {
        this.droppedMs += wall - this.maxTickMs;
        wall = this.maxTickMs;
      }
      const ns = Math.round(wall * 1e6 * vm.config.realtimeSpeed);
      if (ns <= 0) continue;
      const from = vm.clockNs;
      vm.beginAdvance(ns);
      // A guest the host cannot run in real time falls behind: the rest of this tick's time is dropped.
      if (!vm.continueAdvance(budget)) this.droppedMs += (ns - (vm.clockNs - from)) / 1e6 / vm.config.realtimeSpeed;
    }
  }
}
