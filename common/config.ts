/** Reading configuration from the environment, with precise messages on bad values. */
export class ConfigError extends Error {
  override name = "ConfigError";
}

type Env = Record<string, string | undefined>;

export function envString(env: Env, name: string, fallback: string): string {
  const v = env[name];
  return v === undefined || v === "" ? fallback : v;
}

export function envNumber(env: Env, name: string, fallback: number, opts: { min?: number; integer?: boolean } = {}): number {
  const raw = env[name];
  if (raw === undefined || raw === "") return fallback;
  const v = Number(raw);
  if (!Number.isFinite(v) || (opts.integer && !Number.isInteger(v)) || (opts.min !== undefined && v < opts.min)) {
    const what = opts.integer ? "an integer" : "a number";
    throw new ConfigError(`${name}=${raw} is not ${what}${opts.min !== undefined ? ` >= ${opts.min}` : ""}`);
  }
  return v;
}

export function envPort(env: Env, name: string, fallback: number): number {
  const raw = env[name];
  if (raw === undefined || raw === "") return fallback;
  const v = Number(raw);
  if (!Number.isInteger(v) || v < 0 || v > 65535) throw new ConfigError(`${name}=${raw} is not a port (an integer in [0, 65535]; 0 picks a free one)`);
  return v;
}

/** An address to bind: empty means the default (127.0.0.1), never "every interface" by accident. */
export function envHost(env: Env, name: string, fallback = "127.0.0.1"): string {
  const raw = (env[name] ?? "").trim();
  if (raw === "") return fallback;
  if (!/^[A-Za-z0-9.:_-]{1,253}$/.test(raw)) throw new ConfigError(`${name}=${raw} is not a host name or address`);
  return raw;
}

export function envBool(env: Env, name: string, fallback: boolean): boolean {
  const raw = env[name];
  if (raw === undefined || raw === "") return fallback;
  if (/^(1|true|yes|on)$/i.test(raw)) return true;
  if (/^(0|false|no|off)$/i.test(raw)) return false;
  throw new ConfigError(`${name}=${raw} is not a boolean (use 1/0, true/false)`);
}

/** Parses "64GiB", "512MiB", "4096", "1TiB" into bytes. */
export function parseBytes(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|TiB|K|M|G|T)?\s*$/i.exec(text);
  if (!m) throw new ConfigError(`'${text}' is not a size (examples: 4096, 512MiB, 64GiB, 1TiB)`);
  const unit = (m[2] ?? "B").toUpperCase().replace("IB", "");
  const shift = { B: 0, K: 10, M: 20, G: 30, T: 40 }[unit as "B" | "K" | "M" | "G" | "T"];
  const v = Number(m[1]) * 2 ** shift;
  if (!Number.isSafeInteger(v)) throw new ConfigError(`'${text}' is not a whole number of bytes`);
  return v;
}

export function formatBytes(n: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = n;
  while (Math.abs(v) >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${Number.isInteger(v) ? v : v.toFixed(2)} ${units[i]}`;
}
