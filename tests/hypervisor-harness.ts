/** Starts a real hypervisor server on 127.0.0.1 port 0 with a real client, for tests and benchmarks. */
import type { ComponentServer } from "../common/component.js";
import { createLogger } from "../common/log.js";
import { connectHypervisor, type HypervisorClient } from "../services/hypervisor/client.js";
import { DEFAULT_COSTS, type CostModel } from "../services/hypervisor/model/cost-model.js";
import { Hypervisor } from "../services/hypervisor/model/hypervisor.js";
import { createHypervisorServer } from "../services/hypervisor/server.js";
import { createShardedHypervisorServer } from "../services/hypervisor/shards.js";

export interface RunningHypervisor {
  hypervisor: Hypervisor;
  client: HypervisorClient;
  address: string;
  httpPort: number;
  close(): Promise<void>;
}

/**
 * A hypervisor server with its VMs on the gRPC thread, or, with workers (by
 * default HYPERVISOR_VM_WORKERS, as the service reads it), in that many
 * worker threads; then the model is not in this thread, and a test that
 * reads it directly fails saying so.
 */
export async function startHypervisor(
  opts: { memoryBudgetBytes?: number; allowFaultInjection?: boolean; costs?: Partial<CostModel>; realtimeTickMs?: number; maxMessageBytes?: number; workers?: number } = {},
): Promise<RunningHypervisor> {
  const options = {
    memoryBudgetBytes: opts.memoryBudgetBytes ?? 2 ** 40,
    costs: { ...DEFAULT_COSTS, ...opts.costs },
    allowFaultInjection: opts.allowFaultInjection ?? true,
  };
  const common = { logger: createLogger("hypervisor", "silent"), realtimeTickMs: opts.realtimeTickMs ?? 0, maxMessageBytes: opts.maxMessageBytes };
  const workers = opts.workers ?? Number(process.env.HYPERVISOR_VM_WORKERS || 0);
  if (workers > 0) {
    const app = createShardedHypervisorServer({ ...options, ...common, workers, logLevel: "silent" });
    const running = await listenLocal(app, connectHypervisor);
    return Object.defineProperty(running, "hypervisor", {
      get() {
        throw new Error(`this test reads the hypervisor's model, which is in ${workers} worker threads (HYPERVISOR_VM_WORKERS)`);
      },
    }) as RunningHypervisor;
  }
  const hypervisor = new Hypervisor(options);
  const app = createHypervisorServer({ hypervisor, ...common });
  return { hypervisor, ...(await listenLocal(app, connectHypervisor)) };
}

/** Binds a component on 127.0.0.1 port 0 and connects a client to it. */
async function listenLocal<C extends { close(): void }>(app: ComponentServer, connect: (address: string) => C) {
  const { grpcPort, httpPort } = await app.listen({ host: "127.0.0.1", grpcPort: 0, httpPort: 0 });
  const address = `127.0.0.1:${grpcPort}`;
  const client = connect(address);
  return {
    client,
    address,
    httpPort,
    async close() {
      client.close();
      await app.close();
    },
  };
}

/** Bit i of a little-endian bitmap. */
export const bit = (bm: Uint8Array, i: number) => (bm[i >>> 3] >> (i & 7)) & 1;

export const GiB = 2 ** 30;
export const MiB = 2 ** 20;

/** Starts a page-tracking device server on 127.0.0.1 port 0 (in this process). */
export async function startDevice(opts: { logCapacity?: number; maxTrackers?: number } = {}) {
  const { PageTrackingDevice } = await import("../services/page-tracking-device/model/device.js");
  const { createDeviceServer } = await import("../services/page-tracking-device/server.js");
  const { connectDevice } = await import("../services/page-tracking-device/client.js");
  const device = new PageTrackingDevice({ logCapacity: opts.logCapacity ?? 1 << 20, maxTrackers: opts.maxTrackers });
  const app = createDeviceServer({ device, logger: createLogger("ptdevice", "silent") });
  return { device, ...(await listenLocal(app, connectDevice)) };
}

/** Polls cond every 50 ms for up to 15 s. */
export async function until(cond: () => Promise<boolean>, what = "the condition"): Promise<void> {
  for (let i = 0; i < 300; i++) {
    if (await cond()) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`timed out waiting for ${what}`);
}

/** The value of the first sample on a component's /metrics whose line matches re (NaN: none). */
export async function metric(port: number, re: RegExp): Promise<number> {
  const m = await fetch(`http://127.0.0.1:${port}/metrics`).then((r) => r.text());
  const hit = m.split("\n").find((l) => re.test(l));
  return hit ? Number(hit.split(" ").at(-1)) : NaN;
}

/** A port nobody listens on right now (for a service that must come back on the same address). */
export async function freePort(): Promise<number> {
  const { createServer } = await import("node:net");
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

/**
 * A source and a destination hypervisor for a test file's migrations, started
 * before its tests and stopped after them (register with node:test's hooks).
 */
export function hypervisorPair(opts: Parameters<typeof startHypervisor>[0] = {}): { readonly src: RunningHypervisor; readonly dst: RunningHypervisor; start(): Promise<void>; stop(): Promise<void> } {
  let pair: [RunningHypervisor, RunningHypervisor] | null = null;
  return {
    get src() {
      return pair![0];
    },
    get dst() {
      return pair![1];
    },
    async start() {
      pair = await Promise.all([startHypervisor(opts), startHypervisor(opts)]);
    },
    async stop() {
      await Promise.all(pair!.map((h) => h.close()));
    },
  };
}
