// The two AudioWorklet processors, run under node with a minimal stand-in for the worklet globals.
import assert from "node:assert/strict";
import { test } from "node:test";

const processors = {};
globalThis.sampleRate = 48000;
globalThis.registerProcessor = (name, cls) => {
  processors[name] = cls;
};
globalThis.AudioWorkletProcessor = class {
  constructor() {
    this.port = { sent: [], onmessage: null, postMessage: (m) => this.port.sent.push(m) };
  }
};
await import("../../static/playback-worklet.js");
await import("../../static/capture-worklet.js");

const QUANTUM = 128;

function jitterBuffer(delaySamples) {
  const p = new processors["jitter-buffer"]();
  p.send = (data) => p.port.onmessage({ data });
  p.send({ type: "config", delaySamples });
  p.render = () => {
    const out = new Float32Array(QUANTUM).fill(NaN); // the engine does not promise zeroed outputs
    p.process([], [[out]]);
    return out;
  };
  return p;
}

const ramp = (from, n) => Float32Array.from({ length: n }, (_, i) => from + i);

test("playback waits for the delay, then plays the samples in order", () => {
  const p = jitterBuffer(300);
  p.send({ type: "audio", samples: ramp(1, 200) });
  assert.deepEqual([...p.render()], new Array(QUANTUM).fill(0)); // 200 < 300 buffered: silence
  p.send({ type: "audio", samples: ramp(201, 200) });
  const first = p.render();
  assert.deepEqual([...first], [...ramp(1, QUANTUM)]);
  assert.deepEqual([...p.render()], [...ramp(129, QUANTUM)]); // across the chunk boundary at 200
  assert.equal(p.buffered, 400 - 2 * QUANTUM);
  assert.equal(p.played, 2 * QUANTUM);
});

test("clear drops everything at once and reports an empty buffer from the message handler", () => {
  const p = jitterBuffer(0);
  p.send({ type: "audio", samples: ramp(1, 5000) });
  p.render();
  p.port.sent.length = 0;
  p.send({ type: "clear" });
  assert.deepEqual(p.port.sent, [{ type: "cleared", buffered: 0, played: QUANTUM, underruns: 0 }]);
  assert.deepEqual([...p.render()], new Array(QUANTUM).fill(0)); // the very next quantum is silent
});

test("after clear a new reply waits for the delay again", () => {
  const p = jitterBuffer(256);
  p.send({ type: "audio", samples: ramp(1, 1000) });
  p.render();
  p.send({ type: "clear" });
  p.send({ type: "audio", samples: ramp(1, 200) });
  assert.equal(p.render()[0], 0);
  p.send({ type: "audio", samples: ramp(201, 100) });
  assert.equal(p.render()[0], 1);
});

test("the end of a reply plays a tail shorter than the delay, padded with silence", () => {
  const p = jitterBuffer(1000);
  p.send({ type: "audio", samples: ramp(1, 50) });
  assert.equal(p.render()[0], 0);
  p.send({ type: "end" });
  const out = p.render();
  assert.deepEqual([...out.subarray(0, 50)], [...ramp(1, 50)]);
  assert.deepEqual([...out.subarray(50)], new Array(QUANTUM - 50).fill(0));
  assert.equal(p.underruns, 0);
  assert.equal(p.port.sent.at(-1).buffered, 0); // draining is reported at once
});

test("running dry mid-reply counts an underrun and re-buffers", () => {
  const p = jitterBuffer(QUANTUM);
  p.send({ type: "audio", samples: ramp(1, QUANTUM) });
  p.render();
  assert.equal(p.underruns, 1);
  p.send({ type: "audio", samples: ramp(1, 64) });
  assert.equal(p.render()[0], 0); // waits for a full delay again
});

test("capture mixes channels to mono and posts ~20 ms blocks", () => {
  const p = new processors["mic-capture"]();
  assert.equal(p.size, 1024); // 48 kHz / 50 = 960, rounded to whole render quanta
  for (let q = 0; q < 8; q++) {
    const left = new Float32Array(QUANTUM).fill(0.5);
    const right = new Float32Array(QUANTUM).fill(-0.1);
    assert.equal(p.process([[left, right]]), true);
  }
  assert.equal(p.port.sent.length, 1);
  const block = p.port.sent[0];
  assert.equal(block.length, 1024);
  assert.ok(block.every((x) => Math.abs(x - 0.2) < 1e-6));
  p.process([[]]); // no input connected yet: nothing happens, the processor stays alive
  assert.equal(p.port.sent.length, 1);
});
