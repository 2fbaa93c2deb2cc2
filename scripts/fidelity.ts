/** npm run fidelity: see clients/calibrate/fidelity.ts, or run with --help. */
import { runFidelity } from "../clients/calibrate/fidelity.js";

process.exitCode = await runFidelity(process.argv.slice(2), { out: process.stdout, err: process.stderr, env: process.env });
