import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { test } from "node:test";
import { promisify } from "node:util";
import { fromBinary } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema } from "@bufbuild/protobuf/wkt";
import * as protoLoader from "@grpc/proto-loader";
import { withProtocMapEntries } from "../reflection.js";
import { startHypervisor, startDevice } from "../../tests/hypervisor-harness.js";

const BUF = new URL("../../node_modules/.bin/buf", import.meta.url).pathname;
const curl = async (url: string, ...flags: string[]) => (await promisify(execFile)(BUF, ["curl", "--protocol", "grpc", "--http2-prior-knowledge", ...flags, url], { encoding: "utf8" })).stdout;

test("a map field's entry message is named as protoc names it, and the field points at it", () => {
  const pkg = protoLoader.loadSync("health/v1/health.proto", { includeDirs: [new URL("../../node_modules/grpc-health-check/proto/", import.meta.url).pathname] });
  const before = fromBinary(FileDescriptorProtoSchema, (pkg["grpc.health.v1.HealthListResponse"] as { fileDescriptorProtos: Buffer[] }).fileDescriptorProtos[0]!);
  const list = (f: typeof before) => f.messageType.find((m) => m.name === "HealthListResponse")!;
  // What protobufjs produces, which Go's protodesc (buf curl, grpcurl) rejects.
  assert.equal(list(before).nestedType[0]!.name, "Statuses");
  const after = fromBinary(FileDescriptorProtoSchema, (withProtocMapEntries(pkg)["grpc.health.v1.HealthListResponse"] as { fileDescriptorProtos: Buffer[] }).fileDescriptorProtos[0]!);
  assert.equal(list(after).nestedType[0]!.name, "StatusesEntry");
  assert.equal(list(after).nestedType[0]!.options?.mapEntry, true);
  assert.equal(list(after).field[0]!.typeName, "StatusesEntry");
  // Nothing else changes.
  assert.deepEqual(after.service, before.service);
  assert.deepEqual(after.messageType.map((m) => m.name), before.messageType.map((m) => m.name));
});

test("buf curl finds every service over reflection, the health service's included, on the hypervisor and the device", async () => {
  const hv = await startHypervisor();
  const dev = await startDevice();
  try {
    for (const [address, service] of [[hv.address, "dirtytrack.hypervisor.v1.HypervisorService"], [dev.address, "dirtytrack.ptdevice.v1.PageTrackingDeviceService"]] as const) {
      const methods = (await curl(`http://${address}`, "--list-methods")).trim().split("\n");
      for (const m of ["grpc.health.v1.Health/Check", "grpc.health.v1.Health/List", "grpc.health.v1.Health/Watch"]) assert.ok(methods.includes(m), `${address} lists ${m}`);
      assert.ok(methods.some((m) => m.startsWith(`${service}/`)), `${address} lists ${service}`);
      assert.deepEqual(JSON.parse(await curl(`http://${address}/grpc.health.v1.Health/Check`, "-d", JSON.stringify({ service }))), { status: "SERVING" });
    }
  } finally {
    await dev.close();
    await hv.close();
  }
});
