/**
 * The command line's shape on commander: one subcommand per job, each with
 * the flag groups it reads (options.ts), its own --help and exit codes.
 * Flags with an argument take the next word even when it starts with a dash,
 * so `--latency -1` and `--latency=-1` mean the same (and are refused the
 * same way). A run returns an exit code; commander's own errors are usage
 * errors (exit 2).
 */
import { Command, CommanderError, Option } from "commander";
import type { Io } from "../../common/io.js";
import { FLAGS, type FlagName, type FlagUse, type Values } from "./options.js";

export interface CommandSpec {
  name: string;
  /** What follows the command's name in its usage line. */
  usage?: string;
  summary: string;
  description?: string;
  groups: readonly (readonly [heading: string, flags: readonly FlagUse[]])[];
  /** Flags accepted but not listed: the command reads them only to explain what to give instead. */
  hidden?: readonly FlagName[];
  /** Exit codes and notes printed after the flags. */
  after?: string;
  isDefault?: boolean;
  run: (v: Values, io: Io) => Promise<number>;
}

export interface ProgramSpec {
  name: string;
  description: string;
  after: string;
  commands: readonly CommandSpec[];
  /** Subcommands with a parser of their own: listed in the help, run with their raw arguments. */
  external: readonly { name: string; summary: string; run: (argv: string[], io: Io) => Promise<number> }[];
}

const USAGE_EXIT = 2;

function flagOption(use: FlagUse): Option {
  const [name, override] = typeof use === "string" ? [use, undefined] : use;
  const flag = FLAGS[name] as { arg?: string; help: string };
  return new Option(flag.arg ? `--${name} <${flag.arg}>` : `--${name}`, override ?? flag.help);
}

/** The values commander parsed, under the flags' own names (as the commands read them). */
function valuesOf(cmd: Command): Values {
  const v: Record<string, string | boolean> = {};
  for (const o of cmd.options) {
    const value = cmd.getOptionValue(o.attributeName()) as string | boolean | undefined;
    if (value !== undefined && o.name() !== "help") v[o.name()] = value;
  }
  return v as Values;
}

/** Runs the command line; commander's own errors (unknown flag, missing argument) are exit 2, --help exit 0. */
export async function runProgram(spec: ProgramSpec, argv: string[], io: Io): Promise<number> {
  const external = spec.external.find((e) => e.name === argv[0]);
  if (external) return external.run(argv.slice(1), io);
  const known = [...spec.commands.map((c) => c.name), ...spec.external.map((e) => e.name)];
  if (argv[0] !== undefined && !argv[0].startsWith("-") && argv[0] !== "help" && !known.includes(argv[0])) {
    io.err.write(`unknown command '${argv[0]}' (use ${known.slice(0, -1).join(", ")} or ${known.at(-1)})\nrun with --help for usage\n`);
    return USAGE_EXIT;
  }
  const columns = io.out.isTTY ? io.out.columns : undefined;
  const program = new Command(spec.name)
    .description(spec.description)
    .exitOverride()
    .configureOutput({ writeOut: (s) => io.out.write(s), writeErr: (s) => io.err.write(s), getOutHelpWidth: () => columns ?? 100, getErrHelpWidth: () => 100 })
    .showHelpAfterError("run with --help for usage")
    .addHelpText("after", `\n${spec.after}`);
  let code = 0;
  for (const c of spec.commands) {
    const cmd = program.command(c.name, { isDefault: c.isDefault }).summary(c.summary).description(c.description ?? c.summary);
    if (c.usage) cmd.usage(c.usage);
    for (const [heading, flags] of c.groups) {
      cmd.optionsGroup(heading);
      for (const f of flags) cmd.addOption(flagOption(f));
    }
    for (const f of c.hidden ?? []) cmd.addOption(flagOption(f).hideHelp());
    if (c.after) cmd.addHelpText("after", `\n${c.after}`);
    cmd.action(async () => {
      code = await c.run(valuesOf(cmd), io);
    });
  }
  for (const e of spec.external) program.command(e.name).summary(e.summary).description(`${e.summary} (${e.name} --help lists its options)`).helpOption(false).allowUnknownOption();
  try {
    await program.parseAsync(argv, { from: "user" });
  } catch (err) {
    if (!(err instanceof CommanderError)) throw err;
    return err.code === "commander.helpDisplayed" || err.code === "commander.help" || err.code === "commander.version" ? 0 : USAGE_EXIT;
  }
  return code;
}
