/**
 * A round costs what is dirty: with a 1% working set inside one of a VM's
 * chunks, every round after the first reads and writes that one chunk and
 * nothing else (counted in RPCs and in pages copied), so a larger guest with
 * the same working set costs no more per round.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { WorkloadPattern } from "../../../proto/gen/dirtytrack/hypervisor/v1/hypervisor.js";
import { GiB, hypervisorPair, metric, MiB, type RunningHypervisor } from "../../../tests/hypervisor-harness.js";
import { migrate } from "../migrate.js";

const CHUNK_PAGES = 4096; // 16 MiB chunks
const WORKING_SET = 328; // 1% of the 32,768 pages

describe("round cost", () => {
  const pair = hypervisorPair();
  before(() => pair.start());
  after(() => pair.stop());

  const handled = (h: RunningHypervisor, method: string) => metric(h.httpPort, new RegExp(`^grpc_server_handled_total\\{[^}]*grpc_method="${method}"[^}]*grpc_code="OK"`)).then((n) => n || 0);
  const copied = (h: RunningHypervisor, vm: string, direction: string) =>
    metric(h.httpPort, new RegExp(`^hypervisor_memory_copied_pages_total\\{vm="${vm}",direction="${direction}"\\}`));

  for (const mechanism of ["bitmap", "bitmap+manual"]) {
    test(`${mechanism}: after round 0, each round copies only the dirty chunk's dirty pages, with one read and one write`, async () => {
      const vm = `rc-${mechanism.replace("+", "-")}`;
      const pages = (128 * MiB) / 4096; // 8 chunks
      await pair.src.client.createVm({ vm, vcpus: 1, seed: 5n, memslots: [{ slot: 0, guestPhysAddr: BigInt(GiB), memorySize: BigInt(128 * MiB) }] });
      // 1% of the pages, all in the third chunk.
      await pair.src.client.setWorkload({
        vm,
        workload: { pattern: WorkloadPattern.WORKLOAD_PATTERN_UNIFORM, writesPerSecond: 200_000, workingSetFirstPage: BigInt(2 * CHUNK_PAGES + 100), workingSetPages: BigInt(WORKING_SET) },
      });
      const reads0 = await handled(pair.src, "ReadMemory");
      const writes0 = await handled(pair.dst, "WriteMemory");
      const r = await migrate({ sourceVm: vm, destinationVm: vm, mechanism, bandwidthBitsPerSecond: 1e9, downtimeLimitMs: 300, chunkPages: CHUNK_PAGES }, { source: pair.src.client, destination: pair.dst.client });
      assert.equal(r.status, "completed");
      assert.equal(r.verification?.match, true);
      assert.ok(r.rounds.length >= 2, `${r.rounds.length} rounds`);
      const later = r.rounds.slice(1);
      assert.ok(later.every((x) => x.pagesSent > 0 && x.pagesSent <= WORKING_SET), "every later round sends at most the working set");
      const chunks = pages / CHUNK_PAGES;
      assert.equal((await handled(pair.src, "ReadMemory")) - reads0, chunks + later.length, "round 0 reads every chunk; later rounds one each");
      assert.equal((await handled(pair.dst, "WriteMemory")) - writes0, chunks + later.length);
      const sent = r.rounds.reduce((n, x) => n + x.pagesSent, 0);
      assert.equal(await copied(pair.src, vm, "read"), sent, "the pages copied out are the pages sent");
      assert.equal(await copied(pair.dst, vm, "write"), sent);
    });
  }
});
