/**
 * Every flag of the migration controller's subcommands, said once: its
 * argument, its unit and default, and the variable it falls back to. The
 * commands (program.ts) pick the groups they read; commander prints each
 * command's --help from here, so the help and the parser cannot disagree.
 */
import { availableParallelism } from "node:os";
import { ALIASES, PARTS } from "./trackers/index.js";
import { WORKLOADS } from "./workloads.js";

const list = (entries: Record<string, string>, width: number) =>
  Object.entries(entries)
    .map(([k, d]) => `\n  ${k.padEnd(width)} ${d}`)
    .join("");

/** A flag: `arg` names its argument (absent: a switch). Durations take ms, s, m or h; a bare number is in the unit the help names. */
interface Flag {
  readonly arg?: string;
  readonly help: string;
}

export const FLAGS = {
  // Where the VM is.
  source: { arg: "addr", help: "the source hypervisor (env: MIGRATION_SOURCE; default: 127.0.0.1:50051)" },
  destination: { arg: "addr", help: "the destination hypervisor (env: MIGRATION_DESTINATION; default: the source)" },
  vm: { arg: "name", help: "the VM (required)" },
  "dest-vm": { arg: "name", help: "the VM created on the destination (default: NAME-migrated)" },

  // The guest.
  memory: { arg: "size", help: "guest memory: 512MiB, 4GiB, 1TiB (default: 4GiB)" },
  vcpus: { arg: "n", help: "vCPUs, 1 to 512 (default: 4)" },
  workload: { arg: "name", help: `the guest's writes (default: hot-cold):${list(WORKLOADS, 11)}` },
  "write-rate": { arg: "n", help: "guest writes per second per vCPU, 0 to 1e9 (default: 100000)" },
  "hot-fraction": { arg: "f", help: "hot-cold: the hot share of memory, in (0, 1] (default: 0.05)" },
  "hot-write-fraction": { arg: "f", help: "hot-cold: the share of writes to hot pages, in (0, 1] (default: 0.9)" },
  "zipf-skew": { arg: "s", help: "zipf: the page of rank k is written with probability ~ 1/k^S, in (0, 10] (default: 0.99, YCSB's)" },
  "checkpoint-every": { arg: "duration", help: "bursty: a checkpoint every T, 1ms to 1h; a bare number is seconds (default: 5s)" },
  "checkpoint-for": { arg: "duration", help: "bursty: each checkpoint lasts T, shorter than --checkpoint-every (default: 0.5s)" },
  "checkpoint-rate": { arg: "n", help: "bursty: writes per second per vCPU during a checkpoint (default: 10x --write-rate)" },
  "checkpoint-fraction": { arg: "f", help: "bursty: the share of memory a checkpoint writes, in (0, 1] (default: 0.25)" },
  "stream-for": { arg: "duration", help: "training: the streaming phase's length; a bare number is seconds (default: 2s)" },
  "stream-rate": { arg: "n", help: "training: the streaming phase's writes per second per vCPU (default: --write-rate)" },
  trace: { arg: "file", help: "trace: the file `record` wrote (its vCPU count is the default --vcpus)" },
  "noisy-vcpu-rate": { arg: "n", help: "vCPU 0 writes N per second instead: one noisy vCPU (default: as the others)" },
  seed: { arg: "n", help: "the workload's seed, a whole number >= 0 (default: 1)" },
  "ring-entries": { arg: "n", help: "dirty-ring entries per vCPU with a ring mechanism, a power of two in [256, 65536] (default: 4096, QEMU's advice)" },
  arch: { arg: "arch", help: "arm64 | x86_64 (default: arm64; x86_64 when the mechanism uses pml)" },
  backing: { arg: "size", help: "4k | 2m | 1g: the host pages behind guest memory, THP or hugetlbfs (default: 4k)" },

  // Policy and link.
  mechanism: {
    arg: "m",
    help: `LOG[+PROTECTION][+ASSIST] (default: bitmap):${list(PARTS, 14)}\n  aliases: ${Object.entries(ALIASES)
      .map(([a, m]) => `${a} = ${m}`)
      .join(", ")}`,
  },
  bandwidth: { arg: "rate", help: "link bandwidth: 10Gbit, 800Mbit, 1.25GB/s, 1GiB/s; a bare number is bits/s (default: 10Gbit)" },
  latency: { arg: "duration", help: "link latency, >= 0; a bare number is ms (default: 0.1ms)" },
  "downtime-limit": { arg: "duration", help: "switch over when the dirty bytes fit in bandwidth x this; a bare number is ms (default: 300ms, as QEMU)" },
  "max-rounds": { arg: "n", help: "force the switchover after N syncs, Xen-style (default: none, as QEMU)" },
  "progress-timeout": { arg: "duration", help: "fail when the remaining bytes have not fallen for this much guest time; a bare number is seconds (default: 150s)" },
  "completion-timeout-per-gib": { arg: "duration", help: "fail past this much guest time per GiB of memory; a bare number is seconds (default: 150s)" },
  "chunk-pages": { arg: "n", help: "pages per copy chunk, a multiple of 64 up to 1048576 (default: 262144 = 1 GiB)" },
  "rpc-timeout": { arg: "duration", help: "wall time to wait for a hypervisor that stopped answering before the migration fails cleanly, 0.1s to 1h; a bare number is seconds (default: 10s)" },
  "auto-converge": { help: "throttle the source's vCPUs when they dirty faster than the link carries, as QEMU's auto-converge (default: off, as QEMU)" },
  "cpu-throttle-initial": { arg: "pct", help: "auto-converge: the first throttle, 1 to 99 (default: 20)" },
  "cpu-throttle-increment": { arg: "pct", help: "auto-converge: added at each later trigger, 1 to 99 (default: 10)" },
  "cpu-throttle-tailslow": { help: "auto-converge: smaller steps near the ideal throttle" },
  "max-cpu-throttle": { arg: "pct", help: "auto-converge: the cap, 1 to 99 (default: 99)" },
  "dirty-limit": { help: "limit each source vCPU's dirty page rate when they dirty faster than the link carries, as QEMU's dirty-limit (needs a ring mechanism; excludes --auto-converge)" },
  "vcpu-dirty-limit": { arg: "mbps", help: "dirty-limit: the limit per vCPU in MB/s (default: 1, QEMU's vcpu-dirty-limit)" },
  "vcpu-dirty-limit-period": { arg: "duration", help: "dirty-limit: how often each vCPU's rate is measured, 1ms to 1s; a bare number is ms (default: 1000ms, x-vcpu-dirty-limit-period)" },
  "throttle-trigger-threshold": { arg: "pct", help: "auto-converge or dirty-limit: dirtied vs transferred bytes in a period that counts as high, 1 to 100 (default: 50)" },
  postcopy: {
    help: "allow post-copy (QEMU's postcopy-ram): when pre-copy stops making progress the guest moves to the destination and its remaining pages follow; a failure after that switch loses the VM (exit 6)",
  },
  "postcopy-after-rounds": { arg: "n", help: "postcopy: switch after N syncs instead" },
  "postcopy-preempt": { help: "postcopy: page requests on a channel of their own (QEMU's postcopy-preempt)" },
  policy: {
    arg: "file",
    help: "a KubeVirt MigrationPolicy (migrations.kubevirt.io/v1alpha1) applied as KubeVirt does: allowAutoConverge, bandwidthPerMigration (caps --bandwidth), completionTimeoutPerGiB, allowPostCopy, allowWorkloadDisruption; other fields are errors",
  },

  // Security.
  "tls-ca": { arg: "file", help: "use TLS and verify the hypervisors against this CA (env: TLS_CA_FILE)" },
  "tls-cert": { arg: "file", help: "client certificate for mutual TLS (env: TLS_CERT_FILE)" },
  "tls-key": { arg: "file", help: "client key for mutual TLS (env: TLS_KEY_FILE)" },
  token: { arg: "token", help: "bearer token the hypervisors require (env: AUTH_TOKEN)" },

  // Output.
  json: { arg: "file", help: "write the report as JSON: QEMU's query-migrate names and types, units in \"units\"" },
  report: { arg: "file", help: "write a self-contained HTML report with charts" },
  "log-scale": { help: "the HTML report's remaining bytes on a log scale" },
  quiet: { help: "no progress display" },

  // serve.
  "hypervisor-a": { arg: "addr", help: "one hypervisor (env: MIGRATION_HYPERVISOR_A; required)" },
  "hypervisor-b": { arg: "addr", help: "the other (env: MIGRATION_HYPERVISOR_B; required)" },
  "http-port": { arg: "port", help: "ops port for /metrics and /healthz (env: MIGRATION_HTTP_PORT; default: 9480)" },
  "grpc-port": { arg: "port", help: "gRPC port of dirtytrack.controller.v1 (PredictMigration), health and reflection (env: MIGRATION_GRPC_PORT; default: 50070)" },
  host: { arg: "addr", help: "bind address (env: MIGRATION_HOST; default: 127.0.0.1)" },
  "realtime-speed": { arg: "f", help: "guest seconds per wall second, in (0, 1000] (default: 1)" },
  "pause-ms": { arg: "duration", help: "wall time between migrations; a bare number is ms (default: 2000ms)" },

  // estimate.
  mode: { arg: "mode", help: "page-sampling | dirty-bitmap | dirty-ring (default: page-sampling, as QEMU)" },
  "calc-time": { arg: "duration", help: "how long to measure, 50ms to 60s; a bare number is seconds (default: 1s)" },
  "sample-pages": { arg: "n", help: "page-sampling: pages per GiB, 128 to 16384 (default: 512)" },

  // compare.
  policies: { arg: "list", help: "none, auto-converge, dirty-limit, postcopy, or KubeVirt MigrationPolicy files (default: none; the policy flags such as --cpu-throttle-initial apply to the cells of their policy)" },
  jobs: { arg: "n", help: `hypervisor processes started on 127.0.0.1, one cell at a time each, 1 to 64 (default: the cores, ${availableParallelism()} here)` },
  hypervisors: { arg: "list", help: "run the cells on these running hypervisors instead (source and destination VM on each)" },
  "rank-by": { arg: "key", help: "the figure the table ranks by (default: downtime)" },
  shard: { arg: "k/n", help: "run only the cells whose index is K modulo N (one task of a Kubernetes Indexed Job)" },

  // predict.
  "working-set": { arg: "size", help: "memory the guest writes to (default: all of it)" },
  "dirty-rate": { arg: "mibps", help: "distinct pages dirtied per second untracked, in MiB/s as QEMU's dirty-rate" },
  "from-estimate": { arg: "file", help: "take the dirty rate (and its calc-time) from `estimate --json`" },
  check: { help: "also migrate a guest built from the numbers (uniform writes over the working set) on two local hypervisors and print the prediction beside what happened, with the errors" },

  // record.
  interval: { arg: "duration", help: "the interval, 1ms to 1h; a bare number is seconds (default: 100ms)" },
  intervals: { arg: "n", help: "how many intervals, 1 to 100000 (default: 50)" },
  out: { arg: "file", help: "the trace file (required); per vCPU with dirty rings, per VM otherwise" },
} as const satisfies Record<string, Flag>;

export type FlagName = keyof typeof FLAGS;

/** The parsed flags of a command: a string for a flag with an argument, true for a switch given. */
export type Values = { [K in FlagName]?: (typeof FLAGS)[K] extends { arg: string } ? string : boolean };

/** A command's flag, with the help that command gives it where it differs. */
export type FlagUse = FlagName | readonly [FlagName, string];

export const GUEST: readonly FlagUse[] = [
  "memory",
  "vcpus",
  "workload",
  "write-rate",
  "hot-fraction",
  "hot-write-fraction",
  "zipf-skew",
  "checkpoint-every",
  "checkpoint-for",
  "checkpoint-rate",
  "checkpoint-fraction",
  "stream-for",
  "stream-rate",
  "trace",
  "noisy-vcpu-rate",
  "seed",
  "ring-entries",
  "arch",
  "backing",
];

/** The policy's parameters (compare takes the switches themselves as its --policies axis). */
export const POLICY_PARAMETERS: readonly FlagUse[] = [
  "max-rounds",
  "progress-timeout",
  "completion-timeout-per-gib",
  "chunk-pages",
  "rpc-timeout",
  "cpu-throttle-initial",
  "cpu-throttle-increment",
  "cpu-throttle-tailslow",
  "max-cpu-throttle",
  "vcpu-dirty-limit",
  "vcpu-dirty-limit-period",
  "throttle-trigger-threshold",
  "postcopy-after-rounds",
  "postcopy-preempt",
];

export const POLICY: readonly FlagUse[] = ["mechanism", "bandwidth", "latency", "downtime-limit", "auto-converge", "dirty-limit", "postcopy", "policy", ...POLICY_PARAMETERS];

export const SECURITY: readonly FlagUse[] = ["tls-ca", "tls-cert", "tls-key", "token"];

export const OUTPUT: readonly FlagUse[] = ["json", "report", "log-scale", "quiet"];
