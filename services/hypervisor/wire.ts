/**
 * Encoders for the two messages that carry guest memory (ReadMemoryResponse
 * from the server, WriteMemoryRequest from a client), writing a chunk's
 * contents once into an exactly sized Buffer. The generated encoder grows its
 * buffer by doubling, moves a nested message to prefix its length, and copies
 * the result out twice more: four copies of every 2 MiB of guest memory.
 * Here every field but contents goes through the generated encoder, and
 * contents is written last (protobuf decoders accept fields in any order).
 */
import { MemoryChunk, WriteMemoryRequest, type ReadMemoryResponse } from "../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";

const LEN = 2; // wire type of length-delimited fields
const tag = (field: number) => (field << 3) | LEN;

function varintBytes(n: number): number {
  let k = 1;
  while (n >= 0x80) {
    n = Math.floor(n / 0x80);
    k++;
  }
  return k;
}

function putVarint(buf: Buffer, pos: number, n: number): number {
  while (n >= 0x80) {
    buf[pos++] = (n & 0x7f) | 0x80;
    n = Math.floor(n / 0x80);
  }
  buf[pos++] = n;
  return pos;
}

/** A length-delimited field's size on the wire, for a payload of len bytes. */
const fieldBytes = (len: number) => 1 + varintBytes(len) + len;

/** A MemoryChunk: its other fields encoded, its contents, and its size on the wire. */
function chunkParts(chunk: MemoryChunk): { head: Uint8Array; contents: Uint8Array; size: number } {
  const head = MemoryChunk.encode({ ...chunk, arriveAtNs: chunk.arriveAtNs ?? 0n, contents: Buffer.alloc(0) }).finish();
  const contents = chunk.contents;
  return { head, contents, size: head.byteLength + (contents.byteLength ? fieldBytes(contents.byteLength) : 0) };
}

/** Writes the chunk as field `field` at pos; returns the position after it. */
function putChunk(buf: Buffer, pos: number, field: number, parts: ReturnType<typeof chunkParts>): number {
  buf[pos++] = tag(field);
  pos = putVarint(buf, pos, parts.size);
  buf.set(parts.head, pos);
  pos += parts.head.byteLength;
  if (parts.contents.byteLength) {
    buf[pos++] = tag(5);
    pos = putVarint(buf, pos, parts.contents.byteLength);
    buf.set(parts.contents, pos);
    pos += parts.contents.byteLength;
  }
  return pos;
}

export function encodeReadMemoryResponse(value: unknown): Buffer {
  const m = value as ReadMemoryResponse;
  if (!m.chunk) return Buffer.alloc(0);
  const parts = chunkParts(m.chunk);
  const buf = Buffer.allocUnsafe(fieldBytes(parts.size));
  putChunk(buf, 0, 1, parts);
  return buf;
}

/** From a partial request, as the client's callers give it. */
export function encodeWriteMemoryRequest(value: unknown): Buffer {
  const m = WriteMemoryRequest.fromPartial(value as Partial<WriteMemoryRequest>);
  const vm = Buffer.from(m.vm, "utf8");
  const parts = m.chunk ? chunkParts(m.chunk) : null;
  const buf = Buffer.allocUnsafe((vm.byteLength ? fieldBytes(vm.byteLength) : 0) + (parts ? fieldBytes(parts.size) : 0));
  let pos = 0;
  if (vm.byteLength) {
    buf[pos++] = tag(1);
    pos = putVarint(buf, pos, vm.byteLength);
    vm.copy(buf, pos);
    pos += vm.byteLength;
  }
  if (parts) putChunk(buf, pos, 2, parts);
  return buf;
}

/** The service's serializers that replace the generated ones (by method key). */
export const serverSerializers = { readMemory: encodeReadMemoryResponse };
export const clientSerializers = { writeMemory: encodeWriteMemoryRequest };

