/**
 * No import circles. At run time none anywhere: every module loads after
 * the ones it imports. In the controller none even through type-only
 * imports, so that a layer (a policy, a phase, a mechanism) never reaches
 * back into what uses it. The hypervisor's model is allowed type-only
 * circles through Vm and Vcpu, as every file of virt/kvm includes
 * kvm_host.h for struct kvm.
 */
import assert from "node:assert/strict";
import { readdirSync, readFileSync, statSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";
import { test } from "node:test";
import ts from "typescript";

const ROOT = resolve(import.meta.dirname, "..");
const DIRS = ["services", "clients", "common", "scripts", "deploy"];

function sources(dir: string): string[] {
  const out: string[] = [];
  for (const name of readdirSync(dir)) {
    const p = join(dir, name);
    if (name === "node_modules" || name === "gen") continue;
    if (statSync(p).isDirectory()) out.push(...sources(p));
    else if (name.endsWith(".ts") && !name.endsWith(".d.ts")) out.push(p);
  }
  return out;
}

/**
 * Each module's local imports, resolved to files (".js" in a specifier
 * names the ".ts" beside it); withTypes: type-only imports count too.
 */
function graph(dirs: string[], withTypes: boolean): Map<string, string[]> {
  const g = new Map<string, string[]>();
  for (const file of dirs.flatMap((d) => sources(join(ROOT, d)))) {
    const sf = ts.createSourceFile(file, readFileSync(file, "utf8"), ts.ScriptTarget.Latest);
    const deps: string[] = [];
    for (const st of sf.statements) {
      if (!(ts.isImportDeclaration(st) || ts.isExportDeclaration(st)) || !st.moduleSpecifier || !ts.isStringLiteral(st.moduleSpecifier)) continue;
      const spec = st.moduleSpecifier.text;
      const typeOnly = ts.isImportDeclaration(st) ? !!st.importClause?.isTypeOnly : st.isTypeOnly;
      if (spec.startsWith(".") && (withTypes || !typeOnly)) deps.push(resolve(dirname(file), spec.replace(/\.js$/, ".ts")));
    }
    g.set(file, deps);
  }
  return g;
}

function findCycle(g: Map<string, string[]>): string[] | null {
  const state = new Map<string, "open" | "done">();
  const stack: string[] = [];
  const visit = (f: string): string[] | null => {
    if (state.get(f) === "done" || !g.has(f)) return null;
    if (state.get(f) === "open") return [...stack.slice(stack.indexOf(f)), f];
    state.set(f, "open");
    stack.push(f);
    for (const d of g.get(f)!) {
      const c = visit(d);
      if (c) return c;
    }
    stack.pop();
    state.set(f, "done");
    return null;
  };
  for (const f of g.keys()) {
    const c = visit(f);
    if (c) return c;
  }
  return null;
}

const show = (cycle: string[] | null) => `import circle: ${cycle?.map((f) => relative(ROOT, f)).join(" -> ")}`;

test("at run time no module imports, directly or through others, a module that imports it", () => {
  const g = graph(DIRS, false);
  assert.ok(g.size > 100, `found only ${g.size} modules`);
  const cycle = findCycle(g);
  assert.equal(cycle, null, show(cycle));
});

test("the clients and common code have no import circle even through type-only imports", () => {
  const g = graph(["clients", "common"], true);
  assert.ok(g.size > 30, `found only ${g.size} modules`);
  const cycle = findCycle(g);
  assert.equal(cycle, null, show(cycle));
});

test("the circle finder finds a circle", () => {
  assert.deepEqual(findCycle(new Map([["a", ["b"]], ["b", ["c"]], ["c", ["a"]]])), ["a", "b", "c", "a"]);
  assert.equal(findCycle(new Map([["a", ["b"]], ["b", []]])), null);
});
