/** A trace file as the workloads of a VM's vCPUs (WORKLOAD_PATTERN_TRACE), with what is wrong with it when it cannot be. */
import { readFileSync } from "node:fs";
import { Workload, WorkloadPattern } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { decodeTrace, traceForVcpus, TraceFormatError, type TraceFile } from "./format.js";

export class TraceFileError extends Error {}

export function readTrace(path: string): TraceFile {
  let buf: Uint8Array;
  try {
    buf = readFileSync(path);
  } catch (e) {
    throw new TraceFileError(`${path}: cannot read it: ${(e as Error).message}`);
  }
  try {
    return decodeTrace(buf);
  } catch (e) {
    if (e instanceof TraceFormatError) throw new TraceFileError(`${path}: ${e.message}`);
    throw e;
  }
}

/**
 * Each vCPU's workload: its own records of a per-vCPU trace (the VM has the
 * trace's vCPUs), or its share of a per-VM trace's pages; idle for a vCPU
 * whose records are all empty. The guest must have the trace's pages.
 */
export function traceWorkloads(t: TraceFile, path: string, vcpus: number, guestPages: number): Workload[] {
  if (!t.perVm && vcpus !== t.vcpus) throw new TraceFileError(`${path} was recorded per vCPU from ${t.vcpus} vCPUs; the guest has ${vcpus} (give --vcpus ${t.vcpus})`);
  if (t.guestPages > guestPages) throw new TraceFileError(`${path} was recorded from a guest of ${t.guestPages} pages; this one has ${guestPages} (give --memory ${(t.guestPages * 4096) / 2 ** 20}MiB or more)`);
  return traceForVcpus(t, vcpus).map((trace) =>
    trace.intervals.some((i) => i.pages.length > 0)
      ? Workload.fromPartial({ pattern: WorkloadPattern.WORKLOAD_PATTERN_TRACE, trace: { intervalNs: BigInt(trace.intervalNs), intervals: trace.intervals } })
      : Workload.fromPartial({ pattern: WorkloadPattern.WORKLOAD_PATTERN_IDLE }),
  );
}
