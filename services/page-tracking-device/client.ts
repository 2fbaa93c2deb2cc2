/** A promise client of the page-tracking device (used by the hypervisor and by tests). */
import { createClient, type ClientOptions, type PromiseClient } from "../../common/client.js";
import * as messages from "../../proto/gen/dirtytrack/ptdevice/v1/ptdevice.js";

export type DeviceClient = PromiseClient<typeof messages.PageTrackingDeviceServiceService>;

export function connectDevice(address: string, opts: ClientOptions = {}): DeviceClient {
  return createClient(messages.PageTrackingDeviceServiceService, messages, address, opts);
}

/**
 * GPAs as little-endian u64, 8 bytes each, and back. GPAs are below 2^52, so
 * a number holds each exactly; the 32-bit halves avoid a BigInt per GPA.
 * (Typed-array views are little-endian on every platform Node runs on here.)
 */
export function gpasToBytes(gpas: ArrayLike<number>): Buffer {
  const words = new Uint32Array(gpas.length * 2);
  for (let i = 0; i < gpas.length; i++) {
    const g = gpas[i];
    const lo = g >>> 0;
    words[2 * i] = lo;
    words[2 * i + 1] = (g - lo) / 4294967296;
  }
  return Buffer.from(words.buffer, 0, words.byteLength);
}

export function bytesToGpas(b: Uint8Array): Float64Array {
  const n = b.byteLength >>> 3;
  const aligned = b.byteOffset % 4 === 0 ? b : new Uint8Array(b);
  const words = new Uint32Array(aligned.buffer, aligned.byteOffset, n * 2);
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) out[i] = words[2 * i] + words[2 * i + 1] * 4294967296;
  return out;
}
