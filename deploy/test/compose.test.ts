/**
 * `docker compose up` for real: a private dockerd, the project's image built
 * from the unmodified deploy/Dockerfile, and the project's docker-compose.yml
 * brought up (every service but Grafana, whose image no registry here
 * serves). Then, through the stack's own Prometheus: every target up, the
 * rules loaded, migrations completing and verified, every dashboard query
 * non-zero where the stack is active; a restarted hypervisor container and
 * the stack recovering by itself; and nothing left behind.
 */
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { parse } from "yaml";
import { connectHypervisor } from "../../services/hypervisor/client.js";
import { missingCommands, needTools } from "../../tests/host-tools.js";
import { freePort } from "../../tests/hypervisor-harness.js";
import { provideBaseImages, run, startDockerEngine, type DockerEngine } from "./docker-engine.js";
import { allTargetsUp, checkDashboards, checkRules, prometheusApi, queryValue, startMechanismLoad, waitFor } from "./stack-checks.js";

const ROOT = new URL("../../", import.meta.url).pathname;
const NEEDS = ["dockerd", "docker", "docker-compose", "debootstrap"];
const compose = parse(readFileSync(join(ROOT, "docker-compose.yml"), "utf8"), { merge: true }) as { services: Record<string, { image?: string }> };
const SERVICES = Object.keys(compose.services).filter((s) => s !== "grafana");
const COMPLETED = 'migration_migrations_total{result="completed",mechanism="bitmap+device"}';

test("docker compose up brings the stack up from the project's own files, and it recovers from a hypervisor restart", { timeout: 900_000 }, async (t) => {
  const missing = [...(process.getuid?.() === 0 ? [] : ["root (dockerd needs it)"]), ...missingCommands(NEEDS)];
  if (!needTools(t, missing, "run as root, apt-get install -y docker.io docker-compose debootstrap")) return;
  const started = Date.now();
  const timings: string[] = [];
  const step = async <T>(name: string, fn: () => Promise<T>): Promise<T> => {
    const t0 = Date.now();
    const r = await fn();
    timings.push(`${name} ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    t.diagnostic(`${name}: ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    return r;
  };
  // Short paths: dockerd's socket path must fit a sockaddr_un.
  const dir = mkdtempSync("/tmp/dtlab-compose-");
  const ports = { HYPERVISOR_A_GRPC_PORT: await freePort(), HYPERVISOR_B_GRPC_PORT: await freePort(), MIGRATION_GRPC_PORT: await freePort(), PROMETHEUS_PORT: await freePort() };
  let engine: DockerEngine | null = null;
  let composeEnv: NodeJS.ProcessEnv = {};
  const project = `dtlab${process.pid}`;
  const dc = (args: string[], timeoutMs = 300_000) => run("docker-compose", ["-p", project, "-f", join(ROOT, "docker-compose.yml"), ...args], { env: composeEnv, cwd: ROOT, timeoutMs });
  let networks: string[] = [];
  let up = false;
  try {
    engine = await step("dockerd up", () => startDockerEngine(dir));
    composeEnv = { ...engine.env, ...Object.fromEntries(Object.entries(ports).map(([k, v]) => [k, String(v)])) };
    const standins = await step("base images", () => provideBaseImages(engine!, compose.services.prometheus!.image!.replace(/^\$\{PROMETHEUS_IMAGE:-(.*)\}$/, "$1"), dir));
    t.diagnostic(`stand-ins built from Debian packages: ${standins.join(", ") || "none (the registry answered)"}`);
    // The image compose's services run, from the unmodified Dockerfile; without the default bridge, the build uses the host's network.
    const image = compose.services["hypervisor-a"]!.image!.replace(/^\$\{DIRTYTRACK_IMAGE:-(.*)\}$/, "$1");
    await step("project image build", () => engine!.docker(["build", "-q", "--network", "host", "-f", "deploy/Dockerfile", "-t", image, ROOT], 600_000));

    // up -d returns once every depends_on health condition held; then every service must report healthy.
    up = true;
    await step("compose up", () => dc(["up", "-d", "--no-build", ...SERVICES]));
    const containers = (await dc(["ps", "-q"])).trim().split("\n");
    assert.equal(containers.length, SERVICES.length, "one container per service");
    networks = (await engine.docker(["network", "ls", "-q", "--filter", `label=com.docker.compose.project=${project}`])).trim().split("\n").filter(Boolean);
    const allHealthy = async () => (await engine!.docker(["inspect", "--format", "{{.State.Health.Status}}", ...containers])).trim().split("\n").every((s) => s === "healthy");
    await step("every service healthy", () => waitFor("every service's health check to pass", allHealthy, 120_000));

    const api = prometheusApi(`http://127.0.0.1:${ports.PROMETHEUS_PORT}`);
    await step("every target up", () => waitFor("Prometheus to have every target up", () => allTargetsUp(api), 60_000));
    await checkRules(api);
    await step("two migrations", () => waitFor("two completed and verified migrations", async () => (await queryValue(api, COMPLETED)) >= 2, 120_000));
    assert.equal(await queryValue(api, 'migration_migrations_total{result=~"verification_failed|failed"}'), 0, "no migration failed or failed its verification");

    // Another service calling the published RPCs: VMs on hypervisor A with every mechanism, collected as a VMM would.
    const hv = connectHypervisor(`127.0.0.1:${ports.HYPERVISOR_A_GRPC_PORT}`);
    const load = await startMechanismLoad(hv);
    try {
      await step("every dashboard query non-zero", () => checkDashboards(api));
    } finally {
      await load.stop();
      hv.close();
    }

    // A hypervisor container restarts (its VMs are lost): the stack must recover by itself.
    const before = await queryValue(api, COMPLETED);
    await step("hypervisor-a restart", () => dc(["restart", "hypervisor-a"]));
    await step("recovered", async () => {
      await waitFor("every service healthy again", allHealthy, 120_000);
      await waitFor("every target up again", () => allTargetsUp(api), 60_000);
      await waitFor("two more completed migrations through both devices", async () => (await queryValue(api, COMPLETED)) >= before + 2, 180_000);
    });
    t.diagnostic(`migrations completed: ${await queryValue(api, COMPLETED)}, failed: ${await queryValue(api, 'migration_migrations_total{result!="completed"}')} (the one in flight when hypervisor-a went away may fail)`);
  } finally {
    if (engine) {
      if (up) await step("compose down", () => dc(["down", "-v", "--remove-orphans"]).catch((e: Error) => t.diagnostic(e.message)));
      await step("dockerd stop", () => engine!.stop());
      // Compose's project network is a Linux bridge on the host: it must be gone with the project.
      const bridges = networks.map((id) => `br-${id.slice(0, 12)}`).filter((br) => existsSync(`/sys/class/net/${br}`));
      assert.deepEqual(bridges, [], "compose down removed its network's bridge");
    } else rmSync(dir, { recursive: true, force: true });
    t.diagnostic(`total ${((Date.now() - started) / 1000).toFixed(1)} s: ${timings.join(", ")}`);
  }
});
