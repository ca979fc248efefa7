// The latency line under each reply, from response.done's timings.
import assert from "node:assert/strict";
import { test } from "node:test";
import { formatTimings } from "../../static/conversation.js";

test("timings show in a fixed order, rounded, skipping stages that did not run", () => {
  assert.equal(
    formatTimings({ asr_ms: 210.4, voice_to_voice_ms: 812.6, llm_first_token_ms: null, total_ms: 2000, endpoint_ms: 500 }),
    "voice to voice 813 ms · end of turn 500 ms · speech recognition 210 ms · reply total 2000 ms",
  );
});

test("no timings give an empty line", () => {
  assert.equal(formatTimings({}), "");
  assert.equal(formatTimings(undefined), "");
});
