/**
 * A private Docker engine for the compose test: Debian's dockerd on its own
 * data, exec and socket directories, with the host's network left alone
 * (no iptables rules, no default bridge), and the base images the project's
 * Dockerfile and compose file name, built offline when no registry answers.
 */
import assert from "node:assert/strict";
import { execFile, spawn } from "node:child_process";
import { copyFileSync, cpSync, existsSync, mkdirSync, openSync, readdirSync, readFileSync, realpathSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { waitFor } from "./stack-checks.js";

const STANDINS = new URL("./standins/", import.meta.url).pathname;

export interface RunOptions {
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  timeoutMs?: number;
}

/** Runs a command to completion; a failure throws with the command's own error output. */
export function run(cmd: string, args: string[], opts: RunOptions = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = execFile(cmd, args, { env: opts.env, cwd: opts.cwd, timeout: opts.timeoutMs ?? 600_000, maxBuffer: 64 << 20, encoding: "utf8" }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${cmd} ${args.join(" ")} failed (${err.code ?? err.signal}):\n${stderr.slice(-4000) || stdout.slice(-4000)}`));
      else resolve(stdout);
    });
    child.stdin?.end();
  });
}

export interface DockerEngine {
  /** Environment for docker and docker-compose: DOCKER_HOST names this engine's socket. */
  env: NodeJS.ProcessEnv;
  docker(args: string[], timeoutMs?: number): Promise<string>;
  /** Stops dockerd by its PID, then checks that none of its processes or mounts remain and removes its directories. */
  stop(): Promise<void>;
}

export async function startDockerEngine(dir: string): Promise<DockerEngine> {
  const [data, exec, sock, pidfile] = [join(dir, "data"), join(dir, "exec"), join(dir, "docker.sock"), join(dir, "docker.pid")];
  mkdirSync(data, { recursive: true });
  mkdirSync(exec, { recursive: true });
  const log = openSync(join(dir, "dockerd.log"), "a");
  const dockerd = spawn("dockerd", ["--data-root", data, "--exec-root", exec, "--host", `unix://${sock}`, "--pidfile", pidfile, "--iptables=false", "--bridge=none"], {
    stdio: ["ignore", log, log],
  });
  const exited = new Promise<void>((resolve) => dockerd.once("exit", () => resolve()));
  const env = { ...process.env, DOCKER_HOST: `unix://${sock}` };
  const docker = (args: string[], timeoutMs?: number) => run("docker", args, { env, timeoutMs });
  try {
    await waitFor("dockerd to answer", async () => dockerd.exitCode === null && (await docker(["version", "--format", "{{.Server.Version}}"], 5000)).trim() !== "", 30_000);
  } catch (err) {
    dockerd.kill("SIGTERM");
    throw new Error(`${(err as Error).message}; dockerd's log:\n${readFileSync(join(dir, "dockerd.log"), "utf8").slice(-3000)}`);
  }
  return {
    env,
    docker,
    async stop() {
      if (dockerd.exitCode === null) {
        dockerd.kill("SIGTERM");
        let timer: NodeJS.Timeout | undefined;
        await Promise.race([exited, new Promise((r) => (timer = setTimeout(r, 30_000)))]);
        clearTimeout(timer);
        if (dockerd.exitCode === null && dockerd.signalCode === null) {
          dockerd.kill("SIGKILL");
          await exited;
        }
      }
      // Its containerd and shims are its children and stop with it; nothing may hold its directories.
      await waitFor("dockerd's processes to exit", async () => processesUsing(dir).length === 0, 15_000).catch(() => {
        assert.fail(`processes of the test's dockerd are still running: ${processesUsing(dir).join("; ")}`);
      });
      // dockerd leaves the bind mount of the host's network namespace (exec-root/netns/default) behind: unmount it, and anything else of it.
      for (const target of mountsUnder(dir).reverse()) await run("umount", [target]);
      assert.deepEqual(mountsUnder(dir), [], "no mount of the test's dockerd remains");
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

function mountsUnder(dir: string): string[] {
  return readFileSync("/proc/self/mounts", "utf8")
    .split("\n")
    .map((l) => l.split(" ")[1] ?? "")
    .filter((m) => m === dir || m.startsWith(`${dir}/`));
}

function processesUsing(dir: string): string[] {
  const found: string[] = [];
  for (const pid of readdirSync("/proc").filter((p) => /^\d+$/.test(p))) {
    try {
      const cmdline = readFileSync(`/proc/${pid}/cmdline`, "utf8").replaceAll("\0", " ");
      if (cmdline.includes(dir)) found.push(`${pid}: ${cmdline.slice(0, 160)}`);
    } catch {
      // The process ended while being read.
    }
  }
  return found;
}

/** The Debian mirror this machine's apt uses (debootstrap and the stand-in's apt-get go there). */
function debianMirror(): string {
  const files = ["/etc/apt/sources.list", ...(existsSync("/etc/apt/sources.list.d") ? readdirSync("/etc/apt/sources.list.d").map((f) => join("/etc/apt/sources.list.d", f)) : [])];
  for (const f of files) {
    const m = existsSync(f) ? /(https?:\/\/\S+\/debian)\/?(\s|$)/.exec(readFileSync(f, "utf8")) : null;
    if (m) return m[1]!;
  }
  return "http://deb.debian.org/debian";
}

/**
 * The base images deploy/Dockerfile (node:20-bookworm-slim) and the compose
 * file (Prometheus) need. Each is pulled; where the registry cannot be
 * reached, a stand-in of the same name is built from Debian packages. Returns
 * the names of the stand-ins built.
 */
export async function provideBaseImages(engine: DockerEngine, prometheusImage: string, work: string): Promise<string[]> {
  const standins: string[] = [];
  const wanted: [string, string][] = [
    ["node:20-bookworm-slim", "node.Dockerfile"],
    [prometheusImage, "prometheus.Dockerfile"],
  ];
  let debian = false;
  for (const [image, dockerfile] of wanted) {
    if (await engine.docker(["pull", "-q", image], 60_000).then(() => true, () => false)) continue;
    if (!debian) {
      // A minimal Debian bookworm from the mirror, imported as local/debian:bookworm.
      const rootfs = join(work, "rootfs");
      await run("debootstrap", ["--variant=minbase", "bookworm", rootfs, debianMirror()], { timeoutMs: 600_000 });
      await run("sh", ["-c", `tar -C '${rootfs}' -c . | docker import - local/debian:bookworm`], { env: engine.env });
      rmSync(rootfs, { recursive: true, force: true });
      debian = true;
    }
    const ctx = join(work, `ctx-${standins.length}`);
    mkdirSync(ctx, { recursive: true });
    copyFileSync(join(STANDINS, dockerfile), join(ctx, "Dockerfile"));
    if (dockerfile === "node.Dockerfile") {
      assert.match(process.version, /^v20\./, "the node stand-in carries this machine's Node, which must be 20 as the image's name says");
      copyFileSync(process.execPath, join(ctx, "node"));
      // npm's directory: its bin/npm-cli.js is what `npm` on PATH links to.
      cpSync(dirname(dirname(realpathSync(await run("sh", ["-c", "command -v npm"]).then((p) => p.trim())))), join(ctx, "npm"), { recursive: true });
      copyFileSync(process.env.NODE_EXTRA_CA_CERTS && existsSync(process.env.NODE_EXTRA_CA_CERTS) ? process.env.NODE_EXTRA_CA_CERTS : "/etc/ssl/certs/ca-certificates.crt", join(ctx, "ca-certificates.crt"));
    }
    // Without the default bridge, builds use the host's network (for apt-get and npm).
    await engine.docker(["build", "-q", "--network", "host", "-t", image, ctx], 600_000);
    rmSync(ctx, { recursive: true, force: true });
    standins.push(image);
  }
  return standins;
}
