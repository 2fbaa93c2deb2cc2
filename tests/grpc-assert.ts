/** Asserting on gRPC failures: the status code and the message a user reads. */
import assert from "node:assert/strict";
import { status } from "@grpc/grpc-js";

export async function rejects(p: Promise<unknown>, code: status, re: RegExp): Promise<void> {
  await assert.rejects(p, (e: { code: number; details: string }) => {
    assert.equal(status[e.code], status[code], e.details);
    assert.match(e.details, re);
    return true;
  });
}
