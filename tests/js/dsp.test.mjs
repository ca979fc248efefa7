// Microphone signal helpers: resampling to 16 kHz keeps speech-band tones and removes what would alias.
import assert from "node:assert/strict";
import { test } from "node:test";
import { Resampler, rms, toPcm16Bytes } from "../../static/dsp.js";

const tone = (hz, rate, seconds, amp = 0.5) =>
  Float32Array.from({ length: Math.round(rate * seconds) }, (_, i) => amp * Math.sin((2 * Math.PI * hz * i) / rate));

// Resample in uneven chunks, as audio arrives from a worklet.
function resampleChunked(input, from, to) {
  const r = new Resampler(from, to);
  const parts = [];
  for (let at = 0, n = 1; at < input.length; at += n, n = (n * 7) % 1001 + 1) parts.push(r.process(input.subarray(at, at + n)));
  return Float32Array.from(parts.flatMap((p) => [...p]));
}

// Amplitude of `hz` in `x` (a single-bin DFT).
function amplitudeAt(x, hz, rate) {
  let re = 0;
  let im = 0;
  for (let i = 0; i < x.length; i++) {
    re += x[i] * Math.cos((2 * Math.PI * hz * i) / rate);
    im -= x[i] * Math.sin((2 * Math.PI * hz * i) / rate);
  }
  return (2 * Math.hypot(re, im)) / x.length;
}

for (const from of [48000, 44100]) {
  test(`${from} Hz to 16 kHz keeps length and a 440 Hz tone`, () => {
    const out = resampleChunked(tone(440, from, 1), from, 16000);
    assert.ok(Math.abs(out.length - 16000) <= 20, `got ${out.length} samples`);
    const steady = out.subarray(400, 15600);
    assert.ok(Math.abs(amplitudeAt(steady, 440, 16000) - 0.5) < 0.02);
  });

  test(`${from} Hz to 16 kHz removes a 12 kHz tone instead of folding it to 4 kHz`, () => {
    const out = resampleChunked(tone(12000, from, 1), from, 16000).subarray(400, 15600);
    assert.ok(rms(out) < 0.02, `rms ${rms(out)}`);
  });
}

test("24 kHz to 48 kHz (reply audio) keeps length and a 1 kHz tone", () => {
  const out = resampleChunked(tone(1000, 24000, 1), 24000, 48000);
  assert.ok(Math.abs(out.length - 48000) <= 40, `got ${out.length} samples`);
  assert.ok(Math.abs(amplitudeAt(out.subarray(800, 47200), 1000, 48000) - 0.5) < 0.02);
});

test("the same rate passes samples through", () => {
  const x = tone(440, 16000, 0.1);
  assert.deepEqual(new Resampler(16000, 16000).process(x), x);
});

test("rms of a sine is amplitude over root two; of nothing is zero", () => {
  assert.ok(Math.abs(rms(tone(100, 8000, 1, 0.5)) - 0.5 / Math.SQRT2) < 1e-3);
  assert.equal(rms(new Float32Array(0)), 0);
});

test("pcm16 bytes are little-endian and clipped", () => {
  const b = toPcm16Bytes(Float32Array.from([0, 1, -1, 2, -2, 0.5]));
  const v = new DataView(b.buffer);
  assert.deepEqual([0, 1, 2, 3, 4, 5].map((i) => v.getInt16(i * 2, true)), [0, 32767, -32768, 32767, -32768, 16384]);
  assert.deepEqual([b[2], b[3]], [0xff, 0x7f]);
});
