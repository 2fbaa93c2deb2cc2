/**
 * The Kubernetes manifests, offline: rendered with kustomize (kubectl kustomize), every object
 * checked against the Kubernetes and Prometheus-operator schemas (kubernetes-models), and every
 * image, command, port and variable in them one the project has.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { parseAllDocuments } from "yaml";
import { ConfigMap, Service } from "kubernetes-models/v1";
import { Deployment, StatefulSet } from "kubernetes-models/apps/v1";
import { Job } from "kubernetes-models/batch/v1";
import { PrometheusRule, ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";
import { prometheusRule } from "../k8s/generate.js";
import { missingCommands, needTools } from "../../tests/host-tools.js";

const ROOT = new URL("../../", import.meta.url).pathname;
const KINDS: Record<string, new (o: never) => { validate(): void }> = {
  "v1/ConfigMap": ConfigMap,
  "v1/Service": Service,
  "apps/v1/StatefulSet": StatefulSet,
  "apps/v1/Deployment": Deployment,
  "batch/v1/Job": Job,
  "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor,
  "monitoring.coreos.com/v1/PrometheusRule": PrometheusRule,
};

interface Container {
  name: string;
  image: string;
  command: string[];
  args?: string[];
  env?: { name: string; value: string }[];
  ports?: { name: string; containerPort: number }[];
  readinessProbe?: { grpc?: { port: number } };
  livenessProbe?: { grpc?: { port: number } };
  resources?: { requests?: Record<string, string>; limits?: Record<string, string> };
}

const ENTRIES = ["services/hypervisor/main.ts", "services/page-tracking-device/main.ts", "clients/migration-controller/main.ts"];
/** An entry point's --help (its subcommand's, given one): the variables and flags it documents. */
const helpOf = (entry: string, command?: string) => execFileSync(process.execPath, ["--import", "tsx", join(ROOT, entry), ...(command ? [command] : []), "--help"], { cwd: ROOT, encoding: "utf8" });

test("kubectl kustomize renders the fleet; every object passes its schema; images, commands, ports and variables are the project's", (t) => {
  if (!needTools(t, missingCommands(["kubectl"]), "it comes with this machine kind's image and renders the kustomization offline (kubectl kustomize deploy)")) return;
  const rendered = execFileSync("kubectl", ["kustomize", join(ROOT, "deploy")], { encoding: "utf8" });
  const objects = parseAllDocuments(rendered).map((d) => d.toJSON() as { apiVersion: string; kind: string; metadata: { name: string; labels?: Record<string, string> }; spec?: Record<string, unknown>; data?: Record<string, string> });
  const kinds = objects.map((o) => `${o.kind}/${o.metadata.name}`).sort();
  assert.deepEqual(kinds, [
    "ConfigMap/dashboard-dirty-rates",
    "ConfigMap/dashboard-migration",
    "ConfigMap/dashboard-page-tracking-device",
    "Deployment/migration-controller",
    "Job/compare",
    "PrometheusRule/dirty-tracking",
    "Service/hypervisor",
    "Service/migration-controller",
    "ServiceMonitor/hypervisor",
    "ServiceMonitor/migration-controller",
    "StatefulSet/hypervisor",
  ]);
  for (const o of objects) {
    const Model = KINDS[`${o.apiVersion}/${o.kind}`];
    assert.ok(Model, `a schema for ${o.apiVersion} ${o.kind}`);
    assert.doesNotThrow(() => new Model(o as never).validate(), `${o.kind}/${o.metadata.name} against its schema`);
  }

  const compose = readFileSync(join(ROOT, "docker-compose.yml"), "utf8");
  const image = /image: \$\{DIRTYTRACK_IMAGE:-([^}]+)\}/.exec(compose)![1];
  const containers = objects.flatMap((o) => ((o.spec?.template as { spec?: { containers?: Container[] } })?.spec?.containers ?? []).map((c) => ({ owner: `${o.kind}/${o.metadata.name}`, c })));
  assert.ok(containers.length >= 4);
  for (const { owner, c } of containers) {
    const where = `${owner} / ${c.name}`;
    assert.equal(c.image, image, `${where}: the image docker compose builds`);
    assert.deepEqual(c.command.slice(0, 3), ["node", "--import", "tsx"], where);
    const entry = c.command[3];
    assert.ok(existsSync(join(ROOT, entry)) && ENTRIES.includes(entry), `${where}: ${entry} is an entry point`);
    // The CLI's words after the entry point: a subcommand first (its --help is the one that counts), then flags.
    const words = [...c.command.slice(4), ...(c.args ?? [])];
    const help = helpOf(entry, words[0] !== undefined && !words[0].startsWith("-") ? words[0] : undefined);
    for (const e of c.env ?? []) assert.ok(help.includes(e.name), `${where}: ${e.name} is a variable ${entry} documents`);
    for (const p of c.ports ?? []) {
      const fromEnv = (c.env ?? []).find((e) => /_(GRPC|HTTP)_PORT$/.test(e.name) && Number(e.value) === p.containerPort);
      assert.ok(fromEnv, `${where}: port ${p.containerPort} (${p.name}) is the one its variables bind`);
    }
    for (const probe of [c.readinessProbe, c.livenessProbe]) {
      if (probe?.grpc) assert.ok((c.ports ?? []).some((p) => p.containerPort === probe.grpc!.port), `${where}: the gRPC health probe's port is served`);
    }
    assert.ok(c.resources?.requests?.memory && c.resources?.limits?.memory, `${where}: memory requests and limits`);
    // The CLI's flags in args exist.
    for (const a of words) {
      const flag = /^--([a-z-]+)/.exec(a)?.[1];
      if (flag) assert.match(help, new RegExp(`--${flag}\\b`), `${where}: --${flag} is a flag of the CLI`);
    }
  }
  // Services route to ports the pods name; ServiceMonitors to ports the Services name.
  const podPorts = new Set(containers.flatMap(({ c }) => (c.ports ?? []).map((p) => p.name)));
  const services = objects.filter((o) => o.kind === "Service");
  for (const s of services) for (const p of (s.spec as { ports: { targetPort: string; name: string }[] }).ports) assert.ok(podPorts.has(p.targetPort), `Service ${s.metadata.name}: ${p.targetPort}`);
  for (const m of objects.filter((o) => o.kind === "ServiceMonitor")) {
    const sel = (m.spec as { selector: { matchLabels: Record<string, string> } }).selector.matchLabels;
    const target = services.find((s) => Object.entries(sel).every(([k, v]) => s.metadata.labels?.[k] === v));
    assert.ok(target, `ServiceMonitor ${m.metadata.name} selects a Service`);
    const names = new Set((target.spec as { ports: { name: string }[] }).ports.map((p) => p.name));
    for (const e of (m.spec as { endpoints: { port: string }[] }).endpoints) assert.ok(names.has(e.port), `ServiceMonitor ${m.metadata.name}: port ${e.port}`);
  }
  // The dashboards as the compose stack provisions them, labelled for Grafana's sidecar; the rules as Prometheus loads them.
  for (const cm of objects.filter((o) => o.kind === "ConfigMap")) {
    assert.equal(cm.metadata.labels?.grafana_dashboard, "1");
    for (const [file, json] of Object.entries(cm.data ?? {})) assert.equal(json, readFileSync(join(ROOT, "deploy/grafana/dashboards", file), "utf8"), file);
  }
  assert.equal(readFileSync(join(ROOT, "deploy/k8s/prometheus-rule.yaml"), "utf8"), prometheusRule(), "run npm run k8s (deploy/k8s/prometheus-rule.yaml)");
});
