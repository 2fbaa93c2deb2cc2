/** A FIFO of GPAs in a growable Float64Array (no object per GPA). */
export class GpaQueue {
  private buf = new Float64Array(64);
  private head = 0;
  private tail = 0;

  get allocatedBytes(): number {
    return this.buf.byteLength;
  }

  get length(): number {
    return this.tail - this.head;
  }

  push(gpa: number): void {
    if (this.tail === this.buf.length) {
      const live = this.length;
      const next = new Float64Array(Math.max(64, live * 2));
      next.set(this.buf.subarray(this.head, this.tail));
      this.buf = next;
      this.head = 0;
      this.tail = live;
    }
    this.buf[this.tail++] = gpa;
  }

  /** Moves up to n GPAs into out at offset; returns how many. */
  take(out: Float64Array, offset: number, n: number): number {
    const k = Math.min(n, this.length);
    out.set(this.buf.subarray(this.head, this.head + k), offset);
    this.head += k;
    if (this.head === this.tail) {
      this.head = this.tail = 0;
      // A drained log gives back what a burst made it grow to.
      if (this.buf.length > 4096) this.buf = new Float64Array(64);
    }
    return k;
  }
}
