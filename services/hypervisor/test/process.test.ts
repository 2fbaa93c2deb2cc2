import assert from "node:assert/strict";
import { checkHealth } from "../../../common/client.js";
import { test } from "node:test";
import { spawnService } from "../../../common/spawn.js";
import { connectHypervisor } from "../client.js";

test("the hypervisor binary serves gRPC, health, reflection-ready metrics, and exits 0 on SIGTERM", async () => {
  const svc = await spawnService("services/hypervisor/main.ts", {
    HYPERVISOR_GRPC_PORT: "0",
    HYPERVISOR_HTTP_PORT: "0",
    HYPERVISOR_ANNOUNCE: "1",
    HYPERVISOR_MEMORY_BUDGET: "8GiB",
  });
  try {
    const c = connectHypervisor(svc.address);
    await c.createVm({ vm: "p", vcpus: 1, memslots: [{ slot: 0, guestPhysAddr: 1n << 30n, memorySize: 1n << 20n }] });
    assert.equal((await c.listVms({})).vms.length, 1);
    c.close();
    const health = (await fetch(`http://127.0.0.1:${svc.httpPort}/healthz`).then((r) => r.json())) as { status: string };
    assert.equal(health.status, "ok");
    const metrics = await fetch(`http://127.0.0.1:${svc.httpPort}/metrics`).then((r) => r.text());
    assert.match(metrics, /^hypervisor_memory_budget_bytes 8589934592$/m);
    // The 1 MiB VM's state: 256 pages at about 16 B, its TLB and workload batch.
    const allocated = Number(/^hypervisor_memory_allocated_bytes (\d+)$/m.exec(metrics)?.[1]);
    assert.ok(allocated > 256 * 16 && allocated < 64 * 1024, `${allocated} bytes allocated`);
    assert.match(metrics, /grpc_server_handled_total\{grpc_type="unary",grpc_service="dirtytrack.hypervisor.v1.HypervisorService",grpc_method="CreateVm",grpc_code="OK"\} 1/);
    // grpc.health.v1 answers SERVING for the service.
    await checkHealth(svc.address, "dirtytrack.hypervisor.v1.HypervisorService", { deadlineMs: 3000 });
  } finally {
    assert.equal(await svc.stop(), 0);
  }
});

test("the hypervisor binary refuses a bad environment with a clear message and exit code 1", async () => {
  await assert.rejects(
    spawnService("services/hypervisor/main.ts", { HYPERVISOR_GRPC_PORT: "0", HYPERVISOR_HTTP_PORT: "0", HYPERVISOR_MEMORY_BUDGET: "lots" }, 10000),
    /exited with code 1/,
  );
});
