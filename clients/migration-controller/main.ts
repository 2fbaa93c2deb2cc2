/** The migration controller's executable: see cli.ts, or run with --help. */
import { runCli } from "./cli.js";

// A reader that stops early (`… --help | head`) closes the pipe: stop quietly, as other tools do.
for (const stream of [process.stdout, process.stderr]) {
  stream.on("error", (err: NodeJS.ErrnoException) => {
    if (err.code !== "EPIPE") throw err;
    process.exit(process.exitCode ?? 0);
  });
}

process.exitCode = await runCli(process.argv.slice(2), { out: process.stdout, err: process.stderr, env: process.env });
