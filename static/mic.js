// Microphone → 16 kHz mono → Opus packets (WebCodecs) or raw pcm16 where AudioEncoder is missing.

import { Resampler, rms, toPcm16Bytes } from "./dsp.js";

export const INPUT_RATE = 16000;
const FRAME_SAMPLES = INPUT_RATE / 50; // 20 ms, the frame size of both input formats

export const OPUS_INPUT_CONFIG = {
  codec: "opus",
  sampleRate: INPUT_RATE,
  numberOfChannels: 1,
  bitrate: 24000,
  opus: { frameDuration: 20000 }, // microseconds: 20 ms packets, as the server expects
};

/** True where this browser can encode the microphone as Opus. */
export async function canEncodeOpus() {
  if (typeof AudioEncoder === "undefined") return false;
  try {
    return (await AudioEncoder.isConfigSupported(OPUS_INPUT_CONFIG)).supported === true;
  } catch {
    return false;
  }
}

/** Encodes 16 kHz float blocks into Opus packets; `onPacket(Uint8Array)` gets each one. */
class OpusSink {
  constructor(onPacket, onError) {
    this.timestampUs = 0;
    this.encoder = new AudioEncoder({
      output: (chunk) => {
        const packet = new Uint8Array(chunk.byteLength);
        chunk.copyTo(packet);
        onPacket(packet);
      },
      error: (e) => onError(`Opus encoder failed: ${e.message}`),
    });
    this.encoder.configure(OPUS_INPUT_CONFIG);
  }

  push(samples) {
    if (this.encoder.state !== "configured") return;
    const data = new AudioData({
      format: "f32",
      sampleRate: INPUT_RATE,
      numberOfFrames: samples.length,
      numberOfChannels: 1,
      timestamp: this.timestampUs,
      data: samples,
    });
    this.timestampUs += (samples.length * 1e6) / INPUT_RATE;
    this.encoder.encode(data);
    data.close();
  }

  close() {
    if (this.encoder.state !== "closed") this.encoder.close();
  }
}

/** Cuts 16 kHz float blocks into 20 ms pcm16 LE frames; `onPacket(Uint8Array)` gets each one. */
class Pcm16Sink {
  constructor(onPacket) {
    this.onPacket = onPacket;
    this.frame = new Float32Array(FRAME_SAMPLES);
    this.filled = 0;
  }

  push(samples) {
    for (const s of samples) {
      this.frame[this.filled++] = s;
      if (this.filled === FRAME_SAMPLES) {
        this.onPacket(toPcm16Bytes(this.frame));
        this.filled = 0;
      }
    }
  }

  close() {}
}

/**
 * The microphone. `start()` asks for it (throws the browser's error, e.g. NotAllowedError, if refused);
 * audio flows to `onPacket` (Opus packets, or pcm16 frames when `format` is "pcm16") and `onLevel` gets
 * the RMS of each block for the meter. While `muted`, nothing is sent.
 */
export class Mic {
  constructor({ format, onPacket, onLevel, onError }) {
    this.format = format;
    this.onPacket = onPacket;
    this.onLevel = onLevel;
    this.onError = onError;
    this.muted = false;
  }

  async start() {
    this.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    this.context = new AudioContext({ latencyHint: "interactive" });
    await this.context.audioWorklet.addModule(new URL("./capture-worklet.js", import.meta.url));
    const source = this.context.createMediaStreamSource(this.stream);
    // No outputs: the node is a sink, which the browser renders without wiring it to the speakers.
    this.node = new AudioWorkletNode(this.context, "mic-capture", { numberOfInputs: 1, numberOfOutputs: 0 });
    this.resampler = new Resampler(this.context.sampleRate, INPUT_RATE);
    this.sink =
      this.format === "opus" ? new OpusSink(this.onPacket, this.onError) : new Pcm16Sink(this.onPacket);
    this.node.port.onmessage = (event) => this.#onBlock(event.data);
    source.connect(this.node);
    await this.context.resume();
  }

  #onBlock(block) {
    this.onLevel(rms(block));
    const samples = this.resampler.process(block);
    if (!this.muted && samples.length) this.sink.push(samples);
  }

  stop() {
    this.sink?.close();
    this.stream?.getTracks().forEach((t) => t.stop());
    this.context?.close();
    this.sink = this.stream = this.context = null;
  }
}
