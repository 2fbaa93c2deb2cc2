/** A promise client of the page-tracking device (used by the hypervisor and by tests). */
import { createClient, type GrpcClientMetrics, type PromiseClient } from "../../common/client.js";
import * as messages from "../../proto/gen/dirtytrack/ptdevice/v1/ptdevice.js";

export type DeviceClient = PromiseClient<typeof messages.PageTrackingDeviceServiceService>;

export function connectDevice(address: string, opts: { metrics?: GrpcClientMetrics } = {}): DeviceClient {
  return createClient(messages.PageTrackingDeviceServiceService, messages, address, opts);
}

/** Little-endian u64 GPAs <-> numbers, 8 bytes each. */
export function gpasToBytes(gpas: ArrayLike<number>): Buffer {
  const out = Buffer.allocUnsafe(gpas.length * 8);
  for (let i = 0; i < gpas.length; i++) {
    out.writeUInt32LE(gpas[i] % 4294967296, i * 8);
    out.writeUInt32LE(Math.floor(gpas[i] / 4294967296), i * 8 + 4);
  }
  return out;
}

export function bytesToGpas(b: Uint8Array): Float64Array {
  const n = b.byteLength >>> 3;
  const out = new Float64Array(n);
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  for (let i = 0; i < n; i++) out[i] = dv.getUint32(i * 8, true) + dv.getUint32(i * 8 + 4, true) * 4294967296;
  return out;
}
