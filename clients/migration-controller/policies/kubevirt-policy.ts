/**
 * KubeVirt's MigrationPolicy (migrations.kubevirt.io/v1alpha1) as input:
 * the fields of its spec (VMMigrationConfiguration inline, and selectors)
 * applied as KubeVirt applies them (MigrationPolicy.ApplyMigrationPolicy and
 * virt-launcher's migration monitor):
 *  - allowAutoConverge: QEMU's auto-converge with its defaults;
 *  - bandwidthPerMigration (a Kubernetes quantity of bytes per second; 0:
 *    unlimited): the migration's bandwidth, at most the link's;
 *  - completionTimeoutPerGiB (s): the completion timeout;
 *  - allowWorkloadDisruption (defaults to allowPostCopy): at the completion
 *    timeout do not abort, but switch to post-copy if allowPostCopy, or else
 *    pause the guest so that the migration completes by stop-and-copy.
 * Anything else in the spec is refused with its path named; selectors are
 * checked and otherwise not used (the policy is given for this migration).
 */
import { parseDocument } from "yaml";
import type { MigrationConfig } from "../types.js";
import { QEMU_AUTO_CONVERGE } from "./auto-converge.js";

const API_VERSION = "migrations.kubevirt.io/v1alpha1";

export interface KubevirtMigrationPolicy {
  name: string;
  allowAutoConverge?: boolean;
  allowPostCopy?: boolean;
  allowWorkloadDisruption?: boolean;
  /** Bytes per second; 0: unlimited. */
  bandwidthPerMigration?: number;
  completionTimeoutPerGiB?: number;
}

export class PolicyFileError extends Error {}

const BINARY: Record<string, number> = { Ki: 2 ** 10, Mi: 2 ** 20, Gi: 2 ** 30, Ti: 2 ** 40, Pi: 2 ** 50, Ei: 2 ** 60 };
const DECIMAL: Record<string, number> = { m: 1e-3, "": 1, k: 1e3, M: 1e6, G: 1e9, T: 1e12, P: 1e15, E: 1e18 };

/** A Kubernetes resource.Quantity ("64Mi", "1G", "1e9", "500"), as a number. */
export function parseQuantity(q: unknown, path: string): number {
  if (typeof q === "number" && Number.isFinite(q)) return q;
  const m = typeof q === "string" ? /^([+-]?(?:\d+\.?\d*|\.\d+))(?:(Ki|Mi|Gi|Ti|Pi|Ei)|([eE][+-]?\d+)|(m|k|M|G|T|P|E)?)$/.exec(q.trim()) : null;
  if (!m) throw new PolicyFileError(`${path}: ${JSON.stringify(q)} is not a Kubernetes quantity (e.g. 64Mi, 1G, 500)`);
  const n = Number(m[1]);
  if (m[2]) return n * BINARY[m[2]];
  if (m[3]) return n * 10 ** Number(m[3].slice(1));
  return n * DECIMAL[m[4] ?? ""];
}

const TOP_FIELDS = ["apiVersion", "kind", "metadata", "spec", "status"];
const SPEC_FIELDS = ["allowAutoConverge", "allowPostCopy", "allowWorkloadDisruption", "bandwidthPerMigration", "completionTimeoutPerGiB", "selectors"];
const SELECTOR_FIELDS = ["namespaceSelector", "virtualMachineInstanceSelector"];

/** Parses a MigrationPolicy document; every error names the file and the field. */
export function parseMigrationPolicy(text: string, file: string): KubevirtMigrationPolicy {
  const doc = parseDocument(text, { uniqueKeys: true });
  if (doc.errors.length) throw new PolicyFileError(`${file}: not valid YAML: ${doc.errors[0].message.split("\n")[0]}`);
  const at = (path: string) => `${file}: ${path}`;
  const obj = (v: unknown, path: string): Record<string, unknown> => {
    if (v === null || typeof v !== "object" || Array.isArray(v)) throw new PolicyFileError(`${at(path)} must be a mapping`);
    return v as Record<string, unknown>;
  };
  const top = obj(doc.toJS(), "the document");
  for (const k of Object.keys(top)) if (!TOP_FIELDS.includes(k)) throw new PolicyFileError(`${at(k)}: unknown field`);
  if (top.apiVersion !== API_VERSION) throw new PolicyFileError(`${at("apiVersion")} must be ${API_VERSION} (got ${JSON.stringify(top.apiVersion)})`);
  if (top.kind !== "MigrationPolicy") throw new PolicyFileError(`${at("kind")} must be MigrationPolicy (got ${JSON.stringify(top.kind)})`);
  const meta = top.metadata === undefined ? {} : obj(top.metadata, "metadata");
  const spec = obj(top.spec, "spec");
  const out: KubevirtMigrationPolicy = { name: typeof meta.name === "string" ? meta.name : "(unnamed)" };
  for (const [k, v] of Object.entries(spec)) {
    const path = `spec.${k}`;
    if (!SPEC_FIELDS.includes(k)) {
      throw new PolicyFileError(`${at(path)}: unknown field (a MigrationPolicy spec has ${SPEC_FIELDS.join(", ")}; the downtime limit is QEMU's: --downtime-limit)`);
    }
    const bool = () => {
      if (typeof v !== "boolean") throw new PolicyFileError(`${at(path)} must be true or false (got ${JSON.stringify(v)})`);
      return v;
    };
    if (k === "allowAutoConverge") out.allowAutoConverge = bool();
    else if (k === "allowPostCopy") out.allowPostCopy = bool();
    else if (k === "allowWorkloadDisruption") out.allowWorkloadDisruption = bool();
    else if (k === "bandwidthPerMigration") {
      const b = parseQuantity(v, at(path));
      if (!(b >= 0)) throw new PolicyFileError(`${at(path)} must not be negative (got ${JSON.stringify(v)})`);
      out.bandwidthPerMigration = b;
    } else if (k === "completionTimeoutPerGiB") {
      if (!(Number.isInteger(v) && (v as number) > 0)) throw new PolicyFileError(`${at(path)} must be a whole number of seconds > 0 (got ${JSON.stringify(v)})`);
      out.completionTimeoutPerGiB = v as number;
    } else {
      for (const [sk, sv] of Object.entries(obj(v, path))) {
        if (!SELECTOR_FIELDS.includes(sk)) throw new PolicyFileError(`${at(`${path}.${sk}`)}: unknown field (selectors have ${SELECTOR_FIELDS.join(", ")})`);
        for (const [lk, lv] of Object.entries(obj(sv, `${path}.${sk}`))) {
          if (typeof lv !== "string") throw new PolicyFileError(`${at(`${path}.${sk}.${lk}`)} must be a string label value`);
        }
      }
    }
  }
  return out;
}

/** The migration's configuration with the policy applied, as KubeVirt applies it. */
export function applyMigrationPolicy<C extends Omit<MigrationConfig, "sourceVm" | "destinationVm">>(cfg: C, p: KubevirtMigrationPolicy): C {
  const out = { ...cfg };
  if (p.allowAutoConverge !== undefined) out.autoConverge = p.allowAutoConverge ? { ...QEMU_AUTO_CONVERGE } : null;
  if (p.bandwidthPerMigration) out.bandwidthBitsPerSecond = Math.min(out.bandwidthBitsPerSecond, p.bandwidthPerMigration * 8);
  if (p.completionTimeoutPerGiB !== undefined) out.completionTimeoutPerGiBS = p.completionTimeoutPerGiB;
  if (p.allowPostCopy !== undefined || p.allowWorkloadDisruption !== undefined) {
    const postcopy = p.allowPostCopy ?? false;
    // ApplyMigrationPolicy: allowWorkloadDisruption follows allowPostCopy unless the policy sets it.
    const disrupt = p.allowWorkloadDisruption ?? postcopy;
    out.completionTimeoutAction = !disrupt ? "abort" : postcopy ? "postcopy" : "pause";
    out.postcopy = out.completionTimeoutAction === "postcopy" ? { afterRounds: "completion-timeout", preempt: out.postcopy?.preempt ?? false } : null;
  }
  return out;
}
