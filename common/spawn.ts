/**
 * Starts one of the project's services as a child process on 127.0.0.1 with
 * ports picked by the kernel, and waits for the line in which it announces
 * them. Used by the embedded demo and by tests of the real binaries.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { createInterface } from "node:readline";

export interface SpawnedService {
  proc: ChildProcess;
  host: string;
  grpcPort: number;
  httpPort: number;
  address: string;
  /** SIGTERM, then SIGKILL after graceMs; resolves with the exit code. */
  stop(graceMs?: number): Promise<number | null>;
}

const ROOT = new URL("../", import.meta.url).pathname;

export async function spawnService(entry: string, env: Record<string, string>, timeoutMs = 20000, args: string[] = []): Promise<SpawnedService> {
  const proc = spawn(process.execPath, ["--import", "tsx", entry, ...args], {
    cwd: ROOT,
    env: { ...process.env, LOG_LEVEL: process.env.LOG_LEVEL ?? "warn", ...env },
    stdio: ["ignore", "pipe", "inherit"],
  });
  const lines = createInterface({ input: proc.stdout! });
  const announced = await new Promise<{ host: string; grpcPort: number; httpPort: number }>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${entry} did not announce its ports within ${timeoutMs} ms`)), timeoutMs);
    proc.once("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`${entry} exited with code ${code} before listening`));
    });
    lines.on("line", (line) => {
      try {
        const msg = JSON.parse(line);
        if (msg.listening) {
          clearTimeout(timer);
          resolve(msg.listening);
        }
      } catch {
        // Not the announcement: ignore.
      }
    });
  });
  const exited = new Promise<number | null>((resolve) => {
    if (proc.exitCode !== null) resolve(proc.exitCode);
    else proc.once("exit", (code) => resolve(code));
  });
  return {
    proc,
    ...announced,
    address: `${announced.host}:${announced.grpcPort}`,
    async stop(graceMs = 5000) {
      if (proc.exitCode === null && proc.signalCode === null) {
        proc.kill("SIGTERM");
        const t = setTimeout(() => proc.kill("SIGKILL"), graceMs);
        const code = await exited;
        clearTimeout(t);
        return code;
      }
      return exited;
    },
  };
}
