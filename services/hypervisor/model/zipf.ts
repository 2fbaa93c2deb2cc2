/**
 * Zipf-distributed ranks for the key-value store workload: rank k of
 * 1..n with probability proportional to 1 / k^s. Drawn by rejection-
 * inversion (W. Hörmann and G. Derflinger, "Rejection-inversion to generate
 * variates from monotone discrete distributions", ACM TOMACS 6(3), 1996):
 * constant expected time for any n and s, a handful of exp/log a draw, so a
 * slot of 2^28 pages needs no table. The uniform variates come from the
 * workload's own generator, so a seed gives the same pages and a saved
 * generator resumes exactly.
 */
import type { Rng } from "./rng.js";

/** (e^x - 1) / x, continuous at 0. */
const expm1OverX = (x: number) => (Math.abs(x) > 1e-8 ? Math.expm1(x) / x : 1 + x / 2 + (x * x) / 6);
/** ln(1 + x) / x, continuous at 0. */
const log1pOverX = (x: number) => (Math.abs(x) > 1e-8 ? Math.log1p(x) / x : 1 - x / 2 + (x * x) / 3);

export class ZipfSampler {
  private readonly hX1: number;
  private readonly hN: number;
  private readonly squeeze: number;

  constructor(
    private readonly n: number,
    /** The exponent s >= 0 (0 is uniform; a key-value store's keys are typically near 1). */
    private readonly s: number,
  ) {
    this.hX1 = this.hIntegral(1.5) - 1;
    this.hN = this.hIntegral(n + 0.5);
    this.squeeze = 2 - this.hIntegralInverse(this.hIntegral(2.5) - this.h(2));
  }

  /** Fills out with pages first + the scattered rank of n draws (the key-value store's batch of writes). */
  fill(out: Uint32Array, from: number, rng: Rng, first: number): void {
    for (let i = from; i < out.length; i++) out[i] = first + scatter(this.sample(rng) - 1, this.n);
  }

  /** A rank in [1, n]. */
  sample(rng: Rng): number {
    for (;;) {
      const u = this.hN + rng.nextFloat() * (this.hX1 - this.hN);
      const x = this.hIntegralInverse(u);
      const k = Math.min(this.n, Math.max(1, Math.floor(x + 0.5)));
      if (k - x <= this.squeeze || u >= this.hIntegral(k + 0.5) - this.h(k)) return k;
    }
  }

  /** h(x) = x^-s. */
  private h(x: number): number {
    return Math.exp(-this.s * Math.log(x));
  }

  /** The integral of h from 1 to x: (x^(1-s) - 1) / (1 - s), ln x at s = 1. */
  private hIntegral(x: number): number {
    const lx = Math.log(x);
    return expm1OverX((1 - this.s) * lx) * lx;
  }

  private hIntegralInverse(y: number): number {
    let t = y * (1 - this.s);
    if (t < -1) t = -1; // guards rounding at the far end
    return Math.exp(log1pOverX(t) * y);
  }
}

/** A prime multiplier: rank r goes to page r x A mod n, a bijection for every n < A, so the hot keys lie scattered over the working set as a hash table's would. */
const SCATTER = 2654435761;
const SCATTER_HI = Math.floor(SCATTER / 65536);
const SCATTER_LO = SCATTER % 65536;

/** r x SCATTER mod n in exact integer steps (each product below 2^49). */
function scatter(r: number, n: number): number {
  const hi = (((r * SCATTER_HI) % n) * 65536) % n;
  return (hi + ((r * SCATTER_LO) % n)) % n;
}
