// Small signal helpers for the microphone path: resampling to 16 kHz, level, and pcm16 bytes.

/**
 * Streaming resampler (windowed-sinc interpolation). Microphones run at 44.1 or 48 kHz; the server wants
 * 16 kHz, and plain linear interpolation would fold everything above 8 kHz back into the speech band,
 * so the kernel is also a low-pass at the lower rate's Nyquist frequency.
 */
export class Resampler {
  constructor(fromRate, toRate, halfTaps = 16) {
    if (!(fromRate > 0 && toRate > 0)) throw new RangeError("sample rates must be positive");
    this.step = fromRate / toRate; // input samples per output sample
    this.cutoff = Math.min(1, toRate / fromRate) * 0.94; // a little under Nyquist: room for the window
    this.halfTaps = halfTaps;
    // Zeros before the first sample let the first outputs use a full kernel.
    this.buf = new Float32Array(halfTaps);
    this.t = halfTaps; // position of the next output sample in `buf`
  }

  /** Resample the next chunk of input; returns whatever output samples it completes. */
  process(input) {
    if (this.step === 1) return Float32Array.from(input);
    const buf = new Float32Array(this.buf.length + input.length);
    buf.set(this.buf);
    buf.set(input, this.buf.length);
    const out = [];
    const h = this.halfTaps;
    while (Math.floor(this.t) + h < buf.length) {
      out.push(this.#sampleAt(buf, this.t));
      this.t += this.step;
    }
    // Keep only the history the next outputs still reach back to.
    const keepFrom = Math.max(0, Math.floor(this.t) - h + 1);
    this.buf = buf.slice(keepFrom);
    this.t -= keepFrom;
    return Float32Array.from(out);
  }

  #sampleAt(buf, t) {
    const h = this.halfTaps;
    const base = Math.floor(t);
    let acc = 0;
    for (let k = base - h + 1; k <= base + h; k++) {
      const x = t - k;
      const window = 0.5 + 0.5 * Math.cos((Math.PI * x) / h); // Hann over the kernel span
      const arg = Math.PI * this.cutoff * x;
      const sinc = arg === 0 ? 1 : Math.sin(arg) / arg;
      acc += buf[k] * this.cutoff * sinc * window;
    }
    return acc;
  }
}

/** Root-mean-square level of a block of samples (0 for an empty block). */
export function rms(samples) {
  let sum = 0;
  for (const s of samples) sum += s * s;
  return samples.length ? Math.sqrt(sum / samples.length) : 0;
}

/** Float samples in [-1, 1] as pcm16 little-endian bytes (clipped), the server's raw input format. */
export function toPcm16Bytes(samples) {
  const out = new DataView(new ArrayBuffer(samples.length * 2));
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    out.setInt16(i * 2, s < 0 ? Math.round(s * 32768) : Math.round(s * 32767), true);
  }
  return new Uint8Array(out.buffer);
}
