/**
 * The real-time clock drive: VMs whose clock is REALTIME advance by the wall
 * time since their last tick times their speed factor. (STEPPED VMs move only
 * on AdvanceVm.) A tick never advances a VM by more than maxTickMs of wall
 * time, so a stalled event loop costs the guest time rather than a burst.
 */
import type { Vm } from "./vm.js";

export class RealtimeDriver {
  private timer: NodeJS.Timeout | null = null;
  /** Wall time the driver dropped because ticks came late. */
  droppedMs = 0;

  constructor(
    private readonly vms: () => Iterable<Vm>,
    private readonly tickMs = 20,
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
    for (const vm of this.vms()) {
      if (vm.config.clock !== "realtime") continue;
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
      if (ns > 0) vm.advance(ns);
    }
  }
}
