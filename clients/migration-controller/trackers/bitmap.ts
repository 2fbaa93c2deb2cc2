/**
 * Write protection + dirty bitmap, as QEMU drives it: GET_DIRTY_LOG per slot
 * at every sync. With manual protect, GET only copies the log and each chunk
 * of pages is CLEARed (re-protected) just before it is read for sending, as
 * QEMU's clear-bitmap does; INITIALLY_SET additionally skips protecting the
 * whole slot at enable time (round 0 sends every page anyway).
 *
 * The same interface carries the arm64 hardware mechanisms, which only
 * change where KVM's arch sync finds dirty state: `dbm` turns on seed 003's
 * hardware dirty logging (a descriptor scan at every GET), `device` turns on
 * seed 000's page-tracking device (its GPAs read at every GET), `hdbss`
 * FEAT_HDBSS (per-vCPU buffers flushed at every GET). Each is turned on
 * before logging and off after it.
 */
import { Capability, type VmInfo } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import type { HypervisorClient } from "../../../services/hypervisor/client.js";
import type { Assist, MechanismSpec } from "./mechanism.js";
import { setLogging, type DirtyTracker, type SyncResult } from "./tracker.js";

/** The capability of each hardware assist, and its arguments to turn it on and off. */
const HARDWARE_CAP: Partial<Record<Assist, { capability: Capability; on: bigint[]; off: bigint[]; stat: string }>> = {
  dbm: { capability: Capability.CAPABILITY_ARM_HW_DIRTY_LOG, on: [1n], off: [0n], stat: "pages_found_by_descriptor_scan" },
  device: { capability: Capability.CAPABILITY_ARM_PAGE_TRACKING_DEVICE, on: [1n], off: [0n], stat: "pages_read_from_device" },
  // Order 0: 512 entries per vCPU, the size of Intel's PML buffer.
  hdbss: { capability: Capability.CAPABILITY_ARM_HW_DIRTY_STATE_TRACK, on: [0n, 1n], off: [0n, 0n], stat: "pages_flushed_from_hdbss" },
};

const MANUAL_PROTECT_ENABLE = 1n;
const INITIALLY_SET = 2n;

export class BitmapTracker implements DirtyTracker {
  private enabled: number[] = [];
  private previousManual = 0n;
  private gets = 0;
  private synced = 0;
  private clears = 0;

  readonly name: string;
  constructor(
    private readonly spec: MechanismSpec,
    private readonly client: HypervisorClient,
    private readonly vm: VmInfo,
    /** A stepped clock: each GET lets the vCPUs run through it (vcpus_run), as they do on a host. */
    private readonly vcpusRun = false,
  ) {
    this.name = spec.name;
  }

  private hardwareOn = false;

  private get manual(): boolean {
    return this.spec.protection !== "get";
  }

  async start(): Promise<number> {
    const want = { get: 0n, manual: MANUAL_PROTECT_ENABLE, "initially-set": MANUAL_PROTECT_ENABLE | INITIALLY_SET }[this.spec.protection];
    this.previousManual = this.vm.manualDirtyLogProtect;
    await this.client.enableCap({ vm: this.vm.vm, capability: Capability.CAPABILITY_MANUAL_DIRTY_LOG_PROTECT2, args: [want] });
    const hw = HARDWARE_CAP[this.spec.assist];
    if (hw) {
      await this.client.enableCap({ vm: this.vm.vm, capability: hw.capability, args: hw.on });
      this.hardwareOn = true;
    }
    const { slots, hostNs } = await setLogging(this.client, this.vm, true);
    this.enabled = slots;
    return hostNs;
  }

  async sync(): Promise<SyncResult> {
    const bitmaps = new Map<number, Uint8Array>();
    let dirtyPages = 0;
    let hostNs = 0;
    let guestRanNs = 0;
    for (const slot of this.enabled) {
      const r = await this.client.getDirtyLog({ vm: this.vm.vm, slot, vcpusRun: this.vcpusRun });
      bitmaps.set(slot, r.bitmap);
      dirtyPages += Number(r.dirtyPages);
      hostNs += Number(r.hostNs);
      if (r.vcpusRan) guestRanNs += Number(r.hostNs);
      this.synced += Number(r.pagesSynced);
    }
    this.gets += this.enabled.length;
    return { bitmaps, dirtyPages, hostNs, guestRanNs };
  }

  async beforeSend(slot: number, firstPage: number, numPages: number, bitmap: Uint8Array): Promise<number> {
    if (!this.manual || !this.enabled.includes(slot)) return 0;
    const r = await this.client.clearDirtyLog({ vm: this.vm.vm, slot, firstPage: BigInt(firstPage), numPages, bitmap: Buffer.from(bitmap.buffer, bitmap.byteOffset, bitmap.byteLength) });
    this.clears++;
    return Number(r.hostNs);
  }

  async stop(): Promise<void> {
    await setLogging(this.client, this.vm, false, this.enabled);
    this.enabled = [];
    const hw = HARDWARE_CAP[this.spec.assist];
    if (hw && this.hardwareOn) {
      await this.client.enableCap({ vm: this.vm.vm, capability: hw.capability, args: hw.off });
      this.hardwareOn = false;
    }
    await this.client.enableCap({ vm: this.vm.vm, capability: Capability.CAPABILITY_MANUAL_DIRTY_LOG_PROTECT2, args: [this.previousManual] });
  }

  stats(): Record<string, number> {
    const out: Record<string, number> = { get_dirty_log_calls: this.gets, clear_dirty_log_calls: this.clears };
    const hw = HARDWARE_CAP[this.spec.assist];
    if (hw) out[hw.stat] = this.synced;
    return out;
  }
}
