import assert from "node:assert/strict";
import { execFileSync, spawnSync } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { parse } from "yaml";
import { renderAll } from "../grafana/dashboards.js";
import { missingCommands, needTools } from "../../tests/host-tools.js";

const ROOT = new URL("../../", import.meta.url).pathname;

/** A tool CI installs (.ci/run); a developer without it is told how to get it. */
const requireTool = (bin: string, pkg: string, t: { skip(msg: string): void }) => needTools(t, missingCommands([bin]), `apt-get install -y ${pkg}`);

test("docker-compose.yml is valid for the compose specification (dclint) with no errors", () => {
  const r = spawnSync(join(ROOT, "node_modules/.bin/dclint"), ["docker-compose.yml", "-f", "json"], { cwd: ROOT, encoding: "utf8" });
  const report = JSON.parse(r.stdout) as { messages: { type: string; rule: string; message: string }[] }[];
  const messages = report.flatMap((f) => f.messages);
  assert.deepEqual(messages.filter((m) => m.type === "error"), []);
  // The one warning left: no top-level name, which Debian's docker-compose 1.29 would reject.
  assert.deepEqual(messages.map((m) => m.rule), ["require-project-name-field"]);
  assert.equal(r.status, 0);
});

test("Debian's docker-compose accepts the file", (t) => {
  if (!requireTool("docker-compose", "docker-compose", t)) return;
  execFileSync("docker-compose", ["config", "-q"], { cwd: ROOT });
});

test("every service runs a command, and mounts files, that exist in the project", () => {
  const compose = parse(readFileSync(join(ROOT, "docker-compose.yml"), "utf8")) as {
    services: Record<string, { command?: string[]; volumes?: string[]; image?: string; healthcheck?: object; mem_limit?: string }>;
  };
  const ours = ["hypervisor-a", "hypervisor-b", "ptdevice-a", "ptdevice-b", "migration-controller"];
  assert.deepEqual(Object.keys(compose.services).sort(), [...ours, "grafana", "prometheus"].sort());
  for (const [name, svc] of Object.entries(compose.services)) {
    assert.ok(svc.healthcheck, `${name} has a health check`);
    assert.ok(svc.mem_limit, `${name} has a memory limit`);
    for (const v of svc.volumes ?? []) assert.ok(existsSync(join(ROOT, v.split(":")[0])), `${name} mounts ${v}`);
    if (!ours.includes(name)) continue;
    const [node, importFlag, loader, entry] = svc.command!;
    assert.deepEqual([node, importFlag, loader], ["node", "--import", "tsx"]);
    assert.ok(existsSync(join(ROOT, entry)), `${name} runs ${entry}`);
  }
  for (const line of readFileSync(join(ROOT, "deploy/Dockerfile"), "utf8").split("\n")) {
    const m = /^COPY (?!--from)(.+) \S+$/.exec(line);
    if (m) for (const src of m[1].split(" ")) assert.ok(existsSync(join(ROOT, src)), `Dockerfile copies ${src}`);
  }
});

test("the committed dashboards are exactly what deploy/grafana/dashboards.ts generates", () => {
  for (const [name, json] of Object.entries(renderAll())) {
    assert.equal(readFileSync(join(ROOT, `deploy/grafana/dashboards/${name}.json`), "utf8"), json, `run npm run dashboards (${name})`);
  }
});

test("the dashboards import into an existing Grafana: a $datasource variable every query uses, a $vm filter, units Grafana means", () => {
  for (const [name, json] of Object.entries(renderAll())) {
    const d = JSON.parse(json) as { templating: { list: { name: string; type: string }[] }; panels: { type: string; title: string; datasource?: { uid: string }; fieldConfig?: { defaults?: { unit?: string } }; targets?: { expr: string; datasource: { uid: string } }[] }[] };
    const vars = d.templating.list.map((v) => `${v.name}:${v.type}`);
    assert.ok(vars.includes("datasource:datasource"), `${name}: $datasource`);
    for (const p of d.panels.filter((x) => x.type !== "row")) {
      assert.equal(p.datasource?.uid, "${datasource}", `${name} / ${p.title}: the panel's data source`);
      for (const t of p.targets ?? []) assert.equal(t.datasource.uid, "${datasource}", `${name} / ${p.title}: a query's data source`);
      // "pps" is packets per second in Grafana: pages/s is a custom suffix unit.
      assert.notEqual(p.fieldConfig?.defaults?.unit, "pps", `${name} / ${p.title}`);
      if (vars.includes("vm:query")) for (const t of p.targets ?? []) if (/\bvm\b/.test(t.expr) || /vm_/.test(t.expr)) assert.match(t.expr, /vm=~"\$vm"/, `${name} / ${p.title}: ${t.expr} is filtered by $vm`);
    }
  }
});

test("promtool: the Prometheus configuration is valid and the rules pass their unit tests", (t) => {
  if (!requireTool("promtool", "prometheus", t)) return;
  execFileSync("promtool", ["check", "config", "prometheus.yml"], { cwd: join(ROOT, "deploy/prometheus") });
  execFileSync("promtool", ["test", "rules", "rules.test.yml"], { cwd: join(ROOT, "deploy/prometheus") });
});
