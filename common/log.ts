import { pino, type Logger } from "pino";

export type { Logger };

/** One JSON line per event on stderr; LOG_LEVEL picks the threshold (default info, "silent" in tests). */
export function createLogger(component: string, level = process.env.LOG_LEVEL ?? "info"): Logger {
  return pino({ name: component, level, base: { component } }, pino.destination(2));
}
