// Reply audio: 24 kHz mono Opus packets → AudioDecoder → the jitter-buffer worklet → speakers.

import { Resampler } from "./dsp.js";

export const OUTPUT_RATE = 24000;
// Opus decodes at 48 kHz internally and Chrome's AudioDecoder hands out 48 kHz whatever rate it was
// configured with, so the context runs at 48 kHz; other decoder rates are resampled to it.
const PLAYBACK_RATE = 48000;
const OPUS_OUTPUT_CONFIG = { codec: "opus", sampleRate: OUTPUT_RATE, numberOfChannels: 1 };

/** True where this browser can decode the replies. */
export async function canDecodeOpus() {
  if (typeof AudioDecoder === "undefined") return false;
  try {
    return (await AudioDecoder.isConfigSupported(OPUS_OUTPUT_CONFIG)).supported === true;
  } catch {
    return false;
  }
}

/**
 * Plays reply packets. `stats` (shared with the page's counters) gets packetsDecoded, samplesPlayed,
 * bufferedSamples, clears and lastClearToEmptyMs.
 */
export class Player {
  constructor(stats, onError) {
    this.stats = stats;
    this.onError = onError;
    this.decoder = null;
    this.timestampUs = 0;
    this.clearStartedAt = null;
  }

  async start(delayMs) {
    // The browser resamples the context to the output device.
    this.context = new AudioContext({ sampleRate: PLAYBACK_RATE, latencyHint: "interactive" });
    this.stats.playbackRate = this.context.sampleRate;
    await this.context.audioWorklet.addModule(new URL("./playback-worklet.js", import.meta.url));
    this.node = new AudioWorkletNode(this.context, "jitter-buffer", { outputChannelCount: [1] });
    this.node.port.onmessage = (event) => this.#onWorklet(event.data);
    this.node.connect(this.context.destination);
    this.setDelay(delayMs);
    await this.context.resume();
  }

  setDelay(delayMs) {
    if (!this.context) return;
    this.node.port.postMessage({ type: "config", delaySamples: (delayMs * this.context.sampleRate) / 1000 });
  }

  /** Decode and queue one Opus packet. */
  push(packet) {
    if (!this.node) return;
    if (!this.decoder) this.decoder = this.#newDecoder();
    this.decoder.decode(new EncodedAudioChunk({ type: "key", timestamp: this.timestampUs, data: packet }));
    this.timestampUs += 20000;
  }

  /** The response is complete: let the worklet play its tail even if shorter than the delay. */
  endOfResponse() {
    this.node?.port.postMessage({ type: "end" });
  }

  /** Barge-in: drop everything buffered and everything still being decoded. */
  clear() {
    this.clearStartedAt = performance.now();
    this.stats.clears += 1;
    this.stats.bufferedAtLastClear = this.stats.bufferedSamples; // what the clear had to throw away
    // Closing the decoder discards its queued work; outputs of the old one are ignored (see #newDecoder).
    if (this.decoder && this.decoder.state !== "closed") this.decoder.close();
    this.decoder = null;
    this.resamplerRate = null; // its history is the cancelled reply's
    this.node?.port.postMessage({ type: "clear" });
  }

  #newDecoder() {
    const decoder = new AudioDecoder({
      output: (data) => {
        if (decoder === this.decoder) this.#onDecoded(data);
        data.close();
      },
      error: (e) => {
        if (decoder === this.decoder) this.onError(`Opus decoder failed: ${e.message}`);
        this.decoder = decoder === this.decoder ? null : this.decoder;
      },
    });
    decoder.configure(OPUS_OUTPUT_CONFIG);
    return decoder;
  }

  #onDecoded(data) {
    const decoded = new Float32Array(data.numberOfFrames);
    data.copyTo(decoded, { planeIndex: 0, format: "f32-planar" });
    const samples = this.#toContextRate(decoded, data.sampleRate);
    this.stats.packetsDecoded += 1;
    this.stats.samplesQueued += samples.length;
    this.node.port.postMessage({ type: "audio", samples }, [samples.buffer]);
  }

  #toContextRate(samples, rate) {
    if (rate === this.context.sampleRate) return samples;
    if (this.resamplerRate !== rate) {
      this.resampler = new Resampler(rate, this.context.sampleRate);
      this.resamplerRate = rate;
    }
    return this.resampler.process(samples);
  }

  #onWorklet(msg) {
    this.stats.bufferedSamples = msg.buffered;
    this.stats.samplesPlayed = msg.played;
    this.stats.underruns = msg.underruns;
    if (msg.type === "cleared" && this.clearStartedAt !== null) {
      this.stats.lastClearToEmptyMs = performance.now() - this.clearStartedAt;
      this.clearStartedAt = null;
    }
  }

  stop() {
    if (this.decoder && this.decoder.state !== "closed") this.decoder.close();
    this.context?.close();
    this.decoder = this.node = this.context = null;
  }
}
