import { pino, type Logger } from "pino";
import { ConfigError } from "./config.js";

export type { Logger };

const LEVELS = ["fatal", "error", "warn", "info", "debug", "trace", "silent"];

/** One JSON line per event on stderr; LOG_LEVEL picks the threshold (default info, "silent" in tests). */
export function createLogger(component: string, level = process.env.LOG_LEVEL || "info"): Logger {
  if (!LEVELS.includes(level)) throw new ConfigError(`LOG_LEVEL=${level} is not a level (one of ${LEVELS.join(", ")})`);
  return pino({ name: component, level, base: { component } }, pino.destination(2));
}
