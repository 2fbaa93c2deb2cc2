/**
 * sfc32: a small, fast, well-tested 32-bit generator (PractRand-clean) that
 * runs on int32 arithmetic only. Seeded deterministically from a 64-bit seed.
 */
export class Rng {
  private a: number;
  private b: number;
  private c: number;
  private d = 1;

  constructor(seed: bigint) {
    this.a = Number(seed & 0xffffffffn) | 0;
    this.b = Number((seed >> 32n) & 0xffffffffn) | 0;
    this.c = 0x9e3779b9 | 0;
    for (let i = 0; i < 15; i++) this.nextU32();
  }

  /** The generator's state, for a vCPU that migrates. */
  save(): [number, number, number, number] {
    return [this.a, this.b, this.c, this.d];
  }

  restore(st: ArrayLike<number>): void {
    this.a = st[0] | 0;
    this.b = st[1] | 0;
    this.c = st[2] | 0;
    this.d = st[3] | 0;
  }

  nextU32(): number {
    const t = (((this.a + this.b) | 0) + this.d) | 0;
    this.d = (this.d + 1) | 0;
    this.a = this.b ^ (this.b >>> 9);
    this.b = (this.c + (this.c << 3)) | 0;
    this.c = (this.c << 21) | (this.c >>> 11);
    this.c = (this.c + t) | 0;
    return t >>> 0;
  }

  /** Uniform in [0, 1). */
  nextFloat(): number {
    return this.nextU32() / 4294967296;
  }

  /** Uniform integer in [0, n) for n up to 2^53. */
  below(n: number): number {
    if (n <= 4294967296) return Math.floor(this.nextFloat() * n);
    return Math.floor((this.nextU32() * 2097152 + (this.nextU32() >>> 11)) / 9007199254740992 * n);
  }
}

/** splitmix64 step, to derive independent seeds (per vCPU) from one VM seed. */
export function deriveSeed(seed: bigint, stream: number): bigint {
  let z = (seed + 0x9e3779b97f4a7c15n * BigInt(stream + 1)) & 0xffffffffffffffffn;
  z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & 0xffffffffffffffffn;
  z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & 0xffffffffffffffffn;
  return z ^ (z >> 31n);
}
