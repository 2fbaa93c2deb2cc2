/** The tracker that drives a mechanism (see mechanism.ts for how one is named). */
import { Arch, type VmInfo } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { MigrationError } from "../errors.js";
import type { HypervisorClient } from "../../../services/hypervisor/client.js";
import { BitmapTracker } from "./bitmap.js";
import { archOf, type MechanismSpec } from "./mechanism.js";
import { RingTracker } from "./ring.js";
import type { DirtyTracker } from "./tracker.js";

export { ALIASES, allMechanisms, archOf, MechanismError, parseMechanism, PARTS, type Mechanism, type MechanismSpec } from "./mechanism.js";

/**
 * The tracker for spec, once the VM can run it: its architecture, and PML exactly when the VM has it.
 * vcpusRun: the VM is stepped, so its syncs can let the guest run through them.
 */
export function createTracker(spec: MechanismSpec, client: HypervisorClient, vm: VmInfo, vcpusRun: boolean): DirtyTracker {
  const arch = vm.arch === Arch.ARCH_X86_64 ? "x86_64" : "arm64";
  const need = archOf(spec);
  if (need !== "any" && need !== arch) throw new MigrationError("precondition", `mechanism ${spec.name} needs an ${need} VM; '${vm.vm}' is ${arch}`);
  if (vm.pml && spec.assist !== "pml") {
    throw new MigrationError("precondition", `VM '${vm.vm}' logs with Intel PML (the host's enable_pml): use ${spec.name}+pml`);
  }
  if (spec.assist === "pml" && !vm.pml) throw new MigrationError("precondition", `mechanism ${spec.name} needs a VM created with PML; '${vm.vm}' was not`);
  return spec.log === "ring" ? new RingTracker(client, vm, vcpusRun) : new BitmapTracker(spec, client, vm, vcpusRun);
}
