// Runs on the audio thread: mixes the microphone to mono and hands it to the page in ~20 ms blocks
// (one message per 128-sample render quantum would be hundreds of messages a second).

class MicCapture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.size = Math.max(128, Math.round(sampleRate / 50 / 128) * 128);
    this.block = new Float32Array(this.size);
    this.filled = 0;
  }

  process(inputs) {
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true; // no input connected yet
    const n = channels[0].length;
    for (let i = 0; i < n; i++) {
      let sum = 0;
      for (const ch of channels) sum += ch[i];
      this.block[this.filled++] = sum / channels.length;
      if (this.filled === this.size) {
        // Transferred, not copied: this.block is detached afterwards, hence the fresh one.
        this.port.postMessage(this.block, [this.block.buffer]);
        this.block = new Float32Array(this.size);
        this.filled = 0;
      }
    }
    return true;
  }
}

registerProcessor("mic-capture", MicCapture);
