/** The migration controller's executable: see cli.ts, or run with --help. */
import { runCli } from "./cli.js";

process.exitCode = await runCli(process.argv.slice(2), { out: process.stdout, err: process.stderr, env: process.env });
