/** Parsing the CLI's quantities: link rates and durations. */

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

/** "5s", "500ms", "1.5s", or a bare number of seconds. Returns ms. */
export function parseDuration(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s)?\s*$/.exec(text);
  if (!m) throw new Error(`'${text}' is not a duration (examples: 5s, 500ms, 1.5)`);
  return Number(m[1]) * (m[2] === "ms" ? 1 : 1000);
}
