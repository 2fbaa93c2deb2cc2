/**
 * TLS, mutual TLS and the bearer token across the real processes, with
 * certificates made here by openssl: a CA, one certificate for the services
 * (SAN 127.0.0.1) and one for the controller, and a second CA whose
 * certificates must be refused.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { request } from "node:https";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { status } from "@grpc/grpc-js";
import { after, before, describe, test } from "node:test";
import { checkHealth } from "../common/client.js";
import { spawnService, type SpawnedService } from "../common/spawn.js";
import { securityFromEnv, type Security } from "../common/security.js";
import { Capability, MemslotFlag, WorkloadPattern } from "../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { connectHypervisor } from "../services/hypervisor/client.js";
import { runCli } from "../clients/migration-controller/cli.js";
import { GiB, MiB } from "./hypervisor-harness.js";
import { rejects } from "./grpc-assert.js";

const TOKEN = "s3cret-token-for-tests-0123456789";

/** A CA and certificates it signs, with openssl (Debian's, or any). */
function makePki(dir: string) {
  const ssl = (...args: string[]) => execFileSync("openssl", args, { cwd: dir, stdio: "pipe" });
  const ca = (name: string) => {
    ssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", `${name}.key`, "-out", `${name}.pem`, "-days", "2", "-subj", `/CN=${name}`);
  };
  const leaf = (name: string, signer: string) => {
    writeFileSync(join(dir, `${name}.ext`), "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n");
    ssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", `${name}.key`, "-out", `${name}.csr`, "-subj", `/CN=${name}`);
    ssl("x509", "-req", "-in", `${name}.csr`, "-CA", `${signer}.pem`, "-CAkey", `${signer}.key`, "-CAcreateserial", "-out", `${name}.pem`, "-days", "2", "-extfile", `${name}.ext`);
  };
  ca("ca");
  ca("rogue-ca");
  leaf("service", "ca");
  leaf("controller", "ca");
  leaf("intruder", "rogue-ca");
  const p = (f: string) => join(dir, f);
  return {
    serviceEnv: { TLS_CERT_FILE: p("service.pem"), TLS_KEY_FILE: p("service.key"), TLS_CA_FILE: p("ca.pem"), AUTH_TOKEN: TOKEN },
    controller: (over: Partial<Record<"cert" | "key" | "ca" | "token", string>> = {}): Security =>
      securityFromEnv({}, { cert: p("controller.pem"), key: p("controller.key"), ca: p("ca.pem"), token: TOKEN, ...over }),
    files: { ca: p("ca.pem"), cert: p("controller.pem"), key: p("controller.key"), intruderCert: p("intruder.pem"), intruderKey: p("intruder.key") },
  };
}

describe("TLS, mutual TLS and the bearer token", () => {
  let dir: string;
  let pki: ReturnType<typeof makePki>;
  let hv: SpawnedService;
  let dev: SpawnedService;
  before(async () => {
    dir = mkdtempSync(join(tmpdir(), "pki-"));
    pki = makePki(dir);
    const common = { ...pki.serviceEnv, HYPERVISOR_ALLOW_FAULT_INJECTION: "1" };
    hv = await spawnService("services/hypervisor/main.ts", { ...common, HYPERVISOR_GRPC_PORT: "0", HYPERVISOR_HTTP_PORT: "0", HYPERVISOR_ANNOUNCE: "1" });
    // The device registers over mutual TLS with the token, and the hypervisor dials it back the same way.
    dev = await spawnService("services/page-tracking-device/main.ts", {
      ...pki.serviceEnv,
      PTDEVICE_GRPC_PORT: "0",
      PTDEVICE_HTTP_PORT: "0",
      PTDEVICE_ANNOUNCE: "1",
      PTDEVICE_HYPERVISOR: hv.address,
    });
  });
  after(async () => {
    await dev?.stop();
    await hv?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  test("with certificate and token every call works, the device included", async () => {
    const c = connectHypervisor(hv.address, { security: pki.controller() });
    try {
      await c.createVm({ vm: "ok", vcpus: 1, memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(MiB), flags: MemslotFlag.MEMSLOT_FLAG_LOG_DIRTY_PAGES }] });
      assert.equal((await c.checkExtension({ capability: Capability.CAPABILITY_ARM_PAGE_TRACKING_DEVICE })).value, 1n, "the device registered over mTLS");
      await c.enableCap({ vm: "ok", capability: Capability.CAPABILITY_ARM_PAGE_TRACKING_DEVICE, args: [1n] });
      await c.setFaultInjection({ vm: "ok", skipTlbFlushAfterWriteProtect: false });
    } finally {
      c.close();
    }
  });

  test("without the token, or with a wrong one, calls get UNAUTHENTICATED; fault injection and registration included", async () => {
    for (const token of ["", "wrong-token-of-enough-length"]) {
      const c = connectHypervisor(hv.address, { security: { ...pki.controller(), token: token || null } });
      try {
        await rejects(c.listVms({}), status.UNAUTHENTICATED, /missing or wrong bearer token/);
        await rejects(c.setFaultInjection({ vm: "ok", skipTlbFlushAfterWriteProtect: true }), status.UNAUTHENTICATED, /SetFaultInjection/);
        await rejects(c.registerPageTrackingDevice({ address: dev.address }), status.UNAUTHENTICATED, /RegisterPageTrackingDevice/);
      } finally {
        c.close();
      }
    }
  });

  test("a client without a certificate, with one from another CA, or in plaintext cannot connect", async () => {
    const cases: [string, Security][] = [
      ["no client certificate", { ...pki.controller(), cert: null, key: null }],
      ["another CA's certificate", pki.controller({ cert: pki.files.intruderCert, key: pki.files.intruderKey })],
      ["plaintext", { cert: null, key: null, ca: null, token: TOKEN }],
    ];
    for (const [what, security] of cases) {
      const c = connectHypervisor(hv.address, { security, deadlineMs: 3000 });
      try {
        await assert.rejects(c.listVms({}), (e: { code: number }) => e.code === status.UNAVAILABLE || e.code === status.DEADLINE_EXCEEDED, what);
      } finally {
        c.close();
      }
    }
  });

  test("health checks need no token (probes), but still mutual TLS", async () => {
    await checkHealth(hv.address, "dirtytrack.hypervisor.v1.HypervisorService", { security: { ...pki.controller(), token: null }, deadlineMs: 3000 });
  });

  test("the ops port serves HTTPS and asks for a client certificate", async () => {
    const get = (cert?: Buffer, key?: Buffer) =>
      new Promise<number>((resolve, reject) => {
        const req = request({ host: "127.0.0.1", port: hv.httpPort, path: "/healthz", ca: readFileSync(pki.files.ca), cert, key }, (res) => {
          res.resume();
          resolve(res.statusCode ?? 0);
        });
        req.on("error", reject);
        req.end();
      });
    assert.equal(await get(readFileSync(pki.files.cert), readFileSync(pki.files.key)), 200);
    await assert.rejects(get(), "no client certificate: the handshake fails");
    await assert.rejects(fetch(`http://127.0.0.1:${hv.httpPort}/metrics`), "plain HTTP is not served");
  });

  test("the controller CLI migrates over mutual TLS with --tls-ca, --tls-cert, --tls-key and --token", async () => {
    const c = connectHypervisor(hv.address, { security: pki.controller() });
    try {
      await c.createVm({
        vm: "cli",
        vcpus: 1,
        memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(8 * MiB) }],
        workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_HOT_COLD, writesPerSecond: 20_000 },
      });
      await c.advanceVm({ vm: "cli", durationNs: 20_000_000n });
    } finally {
      c.close();
    }
    let err = "";
    const args = ["migrate", "--source", hv.address, "--vm", "cli", "--mechanism", "device", "--quiet", "--tls-ca", pki.files.ca, "--tls-cert", pki.files.cert, "--tls-key", pki.files.key];
    const io = (env: Record<string, string>) => ({ out: { write: () => true }, err: { write: (s: string) => (err += s) }, env });
    assert.equal(await runCli([...args, "--token", TOKEN], io({})), 0, err);
    // The token may come from the environment instead; without any, the hypervisor refuses.
    const tls = ["--quiet", "--tls-ca", pki.files.ca, "--tls-cert", pki.files.cert, "--tls-key", pki.files.key];
    assert.equal(await runCli(["migrate", "--source", hv.address, "--vm", "cli-migrated", "--dest-vm", "again", ...tls], io({ AUTH_TOKEN: TOKEN })), 0, err);
    err = "";
    assert.equal(await runCli(["migrate", "--source", hv.address, "--vm", "again", ...tls], io({})), 1);
    assert.match(err, /source hypervisor at 127\.0\.0\.1:\d+ failed: .*missing or wrong bearer token/);
  });
});
