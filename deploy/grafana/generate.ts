/** npm run dashboards: writes deploy/grafana/dashboards/*.json from dashboards.ts. */
import { writeFileSync } from "node:fs";
import { renderAll } from "./dashboards.js";

const dir = new URL("./dashboards/", import.meta.url).pathname;
const all = renderAll();
for (const [name, json] of Object.entries(all)) writeFileSync(`${dir}${name}.json`, json);
console.log(`wrote ${Object.keys(all).length} dashboards to ${dir}`);
