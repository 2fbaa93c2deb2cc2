/**
 * `calibrate` on this machine kind's real KVM (a small slot, one repetition:
 * this checks that it works and what it writes, not the figures), its
 * refusals, and the description of the host's KVM.
 */
import assert from "node:assert/strict";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { loadCostModel } from "../../../services/hypervisor/model/cost-model.js";
import { describeKvm, runCalibrate } from "../calibrate.js";

const dir = mkdtempSync(join(tmpdir(), "calibrate-test-"));
after(() => rmSync(dir, { recursive: true, force: true }));

function io() {
  const out: string[] = [];
  const err: string[] = [];
  return { io: { out: { write: (s: string) => out.push(s) }, err: { write: (s: string) => err.push(s) }, env: {} }, out, err };
}

const kvm = existsSync("/dev/kvm");
test("calibrate measures this host's KVM, loses no page, and writes a cost model the hypervisor loads", { skip: !kvm && !process.env.CI ? "no /dev/kvm on this host" : false }, async () => {
  const o = io();
  const out = join(dir, "host.json");
  const code = await runCalibrate(["--slot-mib", "16", "--reps", "1", "--out", out], o.io);
  assert.equal(code, 0, o.err.join(""));
  const costs = loadCostModel(out);
  const file = JSON.parse(readFileSync(out, "utf8"));
  for (const k of ["writeNs", "writeFaultNs", "faultSerialNs", "getPageWriteProtectNs", "ringResetEntryNs", "userspaceExitNs"]) {
    assert.equal(typeof file[k], "number", k);
    assert.equal(costs[k as keyof typeof costs], file[k]);
  }
  const m = JSON.parse(readFileSync(join(dir, "host.measurements.json"), "utf8"));
  assert.equal(m.lost_pages, 0);
  assert.equal(m.slot_bytes, 16 * 2 ** 20);
  assert.equal(m.measurements.pf_fixed_per_fault.median, 1, "one write-protection fault per page: the guest ran natively");
  assert.ok(m.kvm.modules.length > 0, "the KVM modules are described");
  assert.match(o.out.join(""), /no dirty page lost/);
  assert.match(o.err.join(""), /phase 6\/6/);
});

test("without a KVM device calibrate says so and exits 3, writing nothing", async () => {
  const o = io();
  const out = join(dir, "none.json");
  assert.equal(await runCalibrate(["--device", join(dir, "no-such-kvm"), "--out", out], o.io), 3);
  assert.match(o.err.join(""), /no usable .*no-such-kvm on this host \(ENOENT\)/);
  assert.equal(existsSync(out), false);
});

test("bad input is refused before anything is measured", async () => {
  for (const [args, msg] of [
    [["--slot-mib", "3"], /--slot-mib must be an even number of MiB from 2 to 1024 \(got '3'\)/],
    [["--reps", "0"], /--reps must be an integer from 1 to 100/],
    [["--out", join(dir, "missing", "x.json")], /cannot write .*x\.json: no such directory/],
    [["--bogus"], /Unknown option '--bogus'/],
  ] as const) {
    const o = io();
    assert.equal(await runCalibrate([...args], o.io), 2, args.join(" "));
    assert.match(o.err.join(""), msg);
  }
  const o = io();
  assert.equal(await runCalibrate(["--help"], o.io), 0);
  assert.match(o.out.join(""), /--slot-mib N .* \(default 256\)/);
});

test("the host's KVM is described from /sys/module", () => {
  const sys = join(dir, "sys");
  const param = (m: string, p: string, v: string) => {
    mkdirSync(join(sys, m, "parameters"), { recursive: true });
    writeFileSync(join(sys, m, "parameters", p), v + "\n");
  };
  param("kvm", "tdp_mmu", "Y");
  param("kvm", "eager_page_split", "N");
  param("kvm_intel", "ept", "Y");
  param("kvm_intel", "pml", "N");
  const d = describeKvm(sys);
  assert.deepEqual(d.modules, ["kvm", "kvm_intel"]);
  assert.equal(d.summary, "kvm_intel: EPT on, PML off; TDP MMU on, eager page split off");
  assert.equal(describeKvm(join(dir, "nowhere")).summary, "no KVM module loaded");
});
