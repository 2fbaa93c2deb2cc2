/**
 * The time a pre-copy still needs, from the state at a sync: the geometric
 * series of QEMU's pre-copy. The round that starts now sends the remaining R
 * bytes in R / B (B the link's bytes per second), during which the guest
 * dirties R q, with q = D / B (D its dirty bytes per second); each round
 * leaves q times what the previous one sent, until what is left fits the
 * threshold T (B x the downtime limit) and stop-and-copy sends it. That is
 * n = ceil(log(T / R) / log q) more rounds and R / B x (1 + q + ... + q^n) in
 * all. At q >= 1 with R > T it never converges at this rate: null. The
 * rate is the last sync's, so a working set that saturates (a hot set
 * rewritten) shows as a lower q, as it does to QEMU's own rule.
 */
export function estimatedCompletionMs(remainingBytes: number, dirtyBytesPerSecond: number, linkBytesPerSecond: number, thresholdBytes: number): number | null {
  const R = remainingBytes;
  const B = linkBytesPerSecond;
  if (!(B > 0)) return null;
  if (R <= thresholdBytes) return (R / B) * 1e3;
  const q = dirtyBytesPerSecond / B;
  if (q >= 1) return null;
  if (q <= 0) return (R / B) * 1e3;
  const n = Math.ceil(Math.log(thresholdBytes / R) / Math.log(q));
  return ((R / B) * ((1 - q ** (n + 1)) / (1 - q))) * 1e3;
}
