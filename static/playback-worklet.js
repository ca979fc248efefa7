// The playback jitter buffer, on the audio thread. It holds decoded reply audio and starts playing only
// once `delaySamples` are buffered (the server's playback_delay_ms), so network jitter does not cause
// gaps; after an underrun it waits for the delay again. A "clear" message (barge-in) drops everything
// at once: the next render quantum is already silent.

const STATS_EVERY = 8; // render quanta between stats messages (~43 ms at 24 kHz)

class JitterBuffer extends AudioWorkletProcessor {
  constructor() {
    super();
    this.chunks = [];
    this.offset = 0; // read position inside chunks[0]
    this.buffered = 0;
    this.played = 0;
    this.underruns = 0;
    this.delaySamples = Math.round(sampleRate * 0.2);
    this.playing = false;
    this.ended = false; // the response is complete: play the tail without waiting for the delay
    this.quanta = 0;
    this.port.onmessage = (event) => this.onMessage(event.data);
  }

  onMessage(msg) {
    if (msg.type === "audio") {
      this.chunks.push(msg.samples);
      this.buffered += msg.samples.length;
      this.ended = false;
    } else if (msg.type === "end") {
      this.ended = true;
    } else if (msg.type === "config") {
      this.delaySamples = Math.max(0, Math.round(msg.delaySamples));
    } else if (msg.type === "clear") {
      this.chunks = [];
      this.offset = 0;
      this.buffered = 0;
      this.playing = false;
      this.ended = false;
      // Reported from here, not from process(), so the page learns the buffer is empty immediately.
      this.report("cleared");
    }
  }

  report(type) {
    this.port.postMessage({ type, buffered: this.buffered, played: this.played, underruns: this.underruns });
  }

  process(_inputs, outputs) {
    const out = outputs[0][0];
    if (!this.playing && this.buffered > 0 && (this.buffered >= this.delaySamples || this.ended)) {
      this.playing = true;
    }
    let i = 0;
    while (this.playing && i < out.length && this.chunks.length) {
      const chunk = this.chunks[0];
      const n = Math.min(out.length - i, chunk.length - this.offset);
      out.set(chunk.subarray(this.offset, this.offset + n), i);
      i += n;
      this.offset += n;
      this.buffered -= n;
      this.played += n;
      if (this.offset === chunk.length) {
        this.chunks.shift();
        this.offset = 0;
      }
    }
    out.fill(0, i); // silence after the last sample (outputs are not guaranteed to be zeroed)
    if (this.playing && this.buffered === 0) {
      this.playing = false;
      if (!this.ended) this.underruns += 1;
    }
    const drained = i > 0 && this.buffered === 0;
    if (drained || (++this.quanta % STATS_EVERY === 0 && this.changed())) this.report("stats");
    return true;
  }

  // Only send stats that say something new: an idle buffer stays quiet on the message port.
  changed() {
    const key = `${this.buffered}/${this.played}`;
    if (key === this.lastKey) return false;
    this.lastKey = key;
    return true;
  }
}

registerProcessor("jitter-buffer", JitterBuffer);
