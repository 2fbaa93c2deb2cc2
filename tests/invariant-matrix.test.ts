/**
 * The kernel's dirty_log_test invariant on both architectures in every valid
 * combination of the log, its protection and the hardware assist, over gRPC:
 * every page reported dirty holds the iteration, and none that holds it is
 * missing.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { Arch, Capability } from "../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import type { HypervisorClient } from "../services/hypervisor/client.js";
import { startDevice, startHypervisor, type RunningHypervisor } from "./hypervisor-harness.js";
import { collectClearLog, collectDirtyLog, collectDirtyRing, runSelftest } from "./selftest.js";

type Enable = (c: HypervisorClient, vm: string) => Promise<void>;
const cap = (capability: Capability, args: bigint[]): Enable => (c, vm) => c.enableCap({ vm, capability, args }).then(() => undefined);

const ARM64_ASSISTS: [string, Enable | undefined][] = [
  ["none", undefined],
  ["dbm", cap(Capability.CAPABILITY_ARM_HW_DIRTY_LOG, [1n])],
  ["device", cap(Capability.CAPABILITY_ARM_PAGE_TRACKING_DEVICE, [1n])],
  ["hdbss", cap(Capability.CAPABILITY_ARM_HW_DIRTY_STATE_TRACK, [0n, 1n])],
];

interface Cell {
  name: string;
  arch: Arch;
  pml: boolean;
  log: "get" | "clear" | "ring";
  enable?: Enable;
}

const cells: Cell[] = [
  ...ARM64_ASSISTS.flatMap(([assist, enable]) =>
    (["get", "clear"] as const).map((log) => ({ name: `arm64 bitmap ${log} ${assist}`, arch: Arch.ARCH_ARM64, pml: false, log, enable })),
  ),
  { name: "arm64 ring", arch: Arch.ARCH_ARM64, pml: false, log: "ring" },
  ...[false, true].flatMap((pml) =>
    (["get", "clear", "ring"] as const).map((log) => ({ name: `x86_64 ${log === "ring" ? "ring" : `bitmap ${log}`} ${pml ? "pml" : "none"}`, arch: Arch.ARCH_X86_64, pml, log })),
  ),
];

describe("the selftest invariant in every valid mechanism combination, both architectures", () => {
  let h: RunningHypervisor;
  let device: Awaited<ReturnType<typeof startDevice>>;
  before(async () => {
    h = await startHypervisor();
    device = await startDevice();
    await h.client.registerPageTrackingDevice({ address: device.address });
  });
  after(async () => {
    await h.client.unregisterPageTrackingDevice({ address: device.address });
    await device.close();
    await h.close();
  });

  for (const cell of cells) {
    test(cell.name, async () => {
      const r = await runSelftest(h.client, {
        vm: cell.name.replaceAll(" ", "-"),
        collect: cell.log === "ring" ? collectDirtyRing : cell.log === "clear" ? collectClearLog : collectDirtyLog,
        initiallySet: cell.log === "clear",
        ringBytes: cell.log === "ring" ? 1 << 20 : undefined,
        create: { arch: cell.arch, pml: cell.pml },
        beforeLogging: cell.enable,
        iterations: 4,
      });
      assert.deepEqual([r.falseDirty, r.lost], [0, 0]);
      assert.ok(r.dirtyPerIteration.every((n) => n > 0x100), "each iteration dirtied enough pages to mean something");
    });
  }
});
