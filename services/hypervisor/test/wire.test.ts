/** The guest-memory encoders decode, with the generated decoder, to exactly what was encoded. */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { ReadMemoryResponse, WriteMemoryRequest } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { encodeReadMemoryResponse, encodeWriteMemoryRequest } from "../wire.js";

const chunk = (contents: number, bitmap: number, firstPage = 0n) => ({
  slot: 3,
  firstPage,
  numPages: 262144,
  bitmap: Buffer.from(Array.from({ length: bitmap }, (_, i) => (i * 37) & 0xff)),
  contents: Buffer.from(Array.from({ length: contents }, (_, i) => (i * 13 + 1) & 0xff)),
});

describe("guest-memory wire encoders", () => {
  for (const [what, c] of [
    ["a 2 MiB chunk", chunk(2 ** 21, 0)],
    ["a selection bitmap and a past-2^32 first page", chunk(8 * 1000, 32768, 2n ** 40n + 64n)],
    ["no contents", chunk(0, 16)],
    ["one byte past a varint boundary (128)", chunk(128, 0)],
  ] as const) {
    test(`${what}: ReadMemoryResponse and WriteMemoryRequest round-trip`, () => {
      assert.deepEqual(ReadMemoryResponse.decode(encodeReadMemoryResponse({ chunk: c })), ReadMemoryResponse.fromPartial({ chunk: c }));
      assert.deepEqual(WriteMemoryRequest.decode(encodeWriteMemoryRequest({ vm: "dst-vm", chunk: c })), WriteMemoryRequest.fromPartial({ vm: "dst-vm", chunk: c }));
    });
  }

  test("absent fields stay absent", () => {
    assert.deepEqual(ReadMemoryResponse.decode(encodeReadMemoryResponse({})), ReadMemoryResponse.fromPartial({}));
    assert.deepEqual(WriteMemoryRequest.decode(encodeWriteMemoryRequest({ vm: "x" })), WriteMemoryRequest.fromPartial({ vm: "x" }));
    assert.deepEqual(WriteMemoryRequest.decode(encodeWriteMemoryRequest({})), WriteMemoryRequest.fromPartial({}));
  });
});
