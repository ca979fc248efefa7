// The conversation log: one list item per turn — what the user said, the assistant's reply as it
// streams in, and that turn's latencies. Text goes in through textContent only, never as HTML.

const TIMING_LABELS = [
  ["voice_to_voice_ms", "voice to voice"],
  ["endpoint_ms", "end of turn"],
  ["asr_ms", "speech recognition"],
  ["llm_first_token_ms", "first token"],
  ["first_sentence_ms", "first sentence"],
  ["tts_first_audio_ms", "first audio"],
  ["total_ms", "reply total"],
];

/** How the end of the turn was decided: the turn model's confidence, or the silence limit. */
function decidedBy(timings) {
  if (Number.isFinite(timings.turn_probability)) return ` (turn model, p ${timings.turn_probability.toFixed(2)})`;
  return " (silence)";
}

/** One line of latencies from response.done's timings, e.g. "voice to voice 812 ms · first token 95 ms". */
export function formatTimings(timings = {}) {
  timings = timings || {};
  const parts = TIMING_LABELS.filter(([key]) => Number.isFinite(timings[key])).map(([key, label]) => {
    const line = `${label} ${Math.round(timings[key])} ms`;
    return key === "endpoint_ms" ? line + decidedBy(timings) : line;
  });
  if (timings.preemptive === true) parts.push("reply started at the pause");
  return parts.join(" · ");
}

export class Conversation {
  constructor(list, emptyHint) {
    this.list = list;
    this.emptyHint = emptyHint;
    this.replies = new Map(); // response_id -> {turn, text}
    this.current = null; // the latest turn
  }

  /** The user's words: always a new turn. */
  user(transcript) {
    const turn = this.#newTurn();
    this.#part(turn, "You", "user").textContent = transcript;
  }

  /** A reply starts: it joins the latest turn if that turn has no reply yet. */
  startReply(responseId) {
    const turn = this.current && !this.current.hasReply ? this.current : this.#newTurn();
    turn.hasReply = true;
    const reply = { turn, text: this.#part(turn, "Assistant", "assistant") };
    this.replies.set(responseId, reply);
    return reply;
  }

  delta(responseId, text) {
    const reply = this.replies.get(responseId) ?? this.startReply(responseId);
    reply.text.textContent += text;
    reply.turn.item.scrollIntoView?.({ block: "nearest" });
  }

  interrupted(responseId) {
    this.replies.get(responseId)?.text.classList.add("interrupted");
  }

  /** response.done: final text if none streamed, the interrupted mark, and the latencies. */
  done({ response_id: id, status, text, timings }) {
    const reply = this.replies.get(id) ?? this.startReply(id);
    if (!reply.text.textContent && text) reply.text.textContent = text;
    if (status !== "completed") this.interrupted(id);
    const line = formatTimings(timings);
    if (line) {
      const p = document.createElement("p");
      p.className = "timings";
      p.textContent = line;
      reply.turn.item.append(p);
    }
  }

  #newTurn() {
    const item = document.createElement("li");
    item.className = "turn";
    this.list.append(item);
    if (this.emptyHint) this.emptyHint.hidden = true;
    this.current = { item, hasReply: false };
    return this.current;
  }

  #part(turn, who, cls) {
    const label = document.createElement("span");
    label.className = "who";
    label.textContent = who;
    const p = document.createElement("p");
    p.className = cls;
    turn.item.append(label, p);
    return p;
  }
}
