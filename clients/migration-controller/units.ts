/** Parsing the CLI's quantities: link rates and durations (ms, s, m or h; a bare number in the flag's own unit). */

/** "10Gbit", "10Gbps", "800Mbit/s", "1.25GB/s", "1GiB/s", or plain bits/s. Returns bits per second. */
export function parseBandwidth(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)(bit|bps|b|B)?(?:\/s|ps)?\s*$/.exec(text);
  if (!m || (m[3] && !m[2])) throw new Error(`'${text}' is not a bandwidth (examples: 10Gbit, 800Mbit, 1.25GB/s, 1GiB/s)`);
  const [, num, prefix, binary, unit] = m;
  const scale = prefix ? (binary ? 1024 : 1000) ** ("KMGT".indexOf(prefix) + 1) : 1;
  const v = Number(num) * scale * (unit === "B" ? 8 : 1);
  if (!(v > 0)) throw new Error(`bandwidth '${text}' must be greater than zero`);
  return v;
}

const MS_PER: Record<string, number> = { ms: 1, s: 1000, m: 60_000, min: 60_000, h: 3_600_000 };

/** "500ms", "1.5s", "2m", "1h", or a bare number in `bare` units (seconds unless said). Returns ms. */
export function parseDuration(text: string, bare: "ms" | "s" = "s"): number {
  const m = /^\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|min|m|h)?\s*$/.exec(text);
  if (!m) throw new Error(`'${text}' is not a duration (examples: 500ms, 1.5s, 2m)`);
  return Number(m[1]) * MS_PER[m[2] ?? bare]!;
}

/** A duration in ms as the help says it: 300ms, 1.5s, 2m, 1h. */
export function formatDuration(ms: number): string {
  if (ms < 1000) return `${ms}ms`;
  if (ms % 3_600_000 === 0) return `${ms / 3_600_000}h`;
  if (ms % 60_000 === 0 && ms > 60_000) return `${ms / 60_000}m`;
  return `${ms / 1000}s`;
}
