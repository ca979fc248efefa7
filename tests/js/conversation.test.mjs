// The latency line under each reply, from response.done's timings.
import assert from "node:assert/strict";
import { test } from "node:test";
import { formatTimings } from "../../static/conversation.js";

test("timings show in a fixed order, rounded, skipping stages that did not run", () => {
  assert.equal(
    formatTimings({ asr_ms: 210.4, voice_to_voice_ms: 812.6, llm_first_token_ms: null, total_ms: 2000, endpoint_ms: 500 }),
    "voice to voice 813 ms · end of turn 500 ms (silence) · speech recognition 210 ms · reply total 2000 ms",
  );
});

test("the end-of-turn decision says what made it, and a preemptive reply says so", () => {
  assert.equal(
    formatTimings({ voice_to_voice_ms: 640, endpoint_ms: 243.2, turn_probability: 0.934, preemptive: true }),
    "voice to voice 640 ms · end of turn 243 ms (turn model, p 0.93) · reply started at the pause",
  );
  assert.equal(formatTimings({ endpoint_ms: 1200, preemptive: false }), "end of turn 1200 ms (silence)");
});

test("no timings give an empty line", () => {
  assert.equal(formatTimings({}), "");
  assert.equal(formatTimings(undefined), "");
});
