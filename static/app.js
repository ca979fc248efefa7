// The demo page: one duplex voice call over the server's WebSocket (docs/PROTOCOL.md).

import { Conversation } from "./conversation.js";
import { Countdown } from "./countdown.js";
import { PacketParser, packPacket } from "./framing.js";
import { Mic, canEncodeOpus } from "./mic.js";
import { Player, canDecodeOpus } from "./player.js";

const $ = (id) => document.getElementById(id);

// Counters for the browser tests (and for anyone curious, in the console).
const stats = {
  state: "idle",
  inputFormat: null,
  packetsSent: 0,
  packetsReceived: 0,
  packetsDecoded: 0,
  playbackRate: null, // sample rate of the playback counters below
  samplesQueued: 0, // decoded reply samples handed to the playback buffer
  samplesPlayed: 0,
  bufferedSamples: 0,
  underruns: 0,
  clears: 0,
  bufferedAtLastClear: null,
  lastClearToEmptyMs: null,
  framingErrors: 0,
  queuePosition: null,
  etaSeconds: null,
  voice: null,
};
window.duplexStats = stats;

const STATE_TEXT = {
  idle: "Not connected",
  connecting: "Connecting…",
  queued: "Waiting in line",
  live: "Connected",
  paused: "Paused",
  closing: "Hanging up…",
  closed: "Call ended",
  error: "Not connected",
};

const ERROR_HELP = {
  unauthorized: "The server refused the API key. Enter the right key under Settings and start again.",
  busy: "The server is busy. Try again in a moment.",
  queue_full: "Too many people are waiting right now. Try again in a few minutes.",
  queue_timeout: "Waited too long in line. Press Start talking to try again.",
  worker_lost: "The server lost the voice engine for this call. Press Start talking to reconnect.",
};

function setState(state, text = STATE_TEXT[state]) {
  stats.state = state;
  $("state").dataset.state = state;
  $("state").textContent = text;
}

function note(text) {
  const p = document.createElement("p");
  p.textContent = text;
  $("message").append(p);
}

function activity(text) {
  $("activity").textContent = text;
}

// Microphone RMS on a -60..0 dBFS scale: speech sits in the middle of the meter, not at its bottom.
function showLevel(rmsValue) {
  const db = 20 * Math.log10(Math.max(rmsValue, 1e-6));
  $("level").value = Math.min(1, Math.max(0, (db + 60) / 60));
}

function micProblem(err) {
  if (err.name === "NotAllowedError" || err.name === "SecurityError") {
    return "Microphone access was refused. Allow the microphone for this site (the icon in the address bar), then press Start talking again.";
  }
  if (err.name === "NotFoundError") return "No microphone was found. Connect one and press Start talking again.";
  return `The microphone could not be opened: ${err.message}`;
}

function socketUrl(apiKey) {
  const url = new URL("/ws/duplex", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  if (apiKey) url.searchParams.set("api_key", apiKey);
  return url.href;
}

function setButtons({ live = false, connected = false } = {}) {
  $("start").disabled = connected;
  $("hangup").disabled = !connected;
  $("pause").disabled = !live;
  $("interrupt").disabled = !live;
}

/** One call: microphone, WebSocket, player, queue countdown and conversation log. */
class Call {
  constructor(apiKey) {
    this.apiKey = apiKey;
    this.parser = new PacketParser();
    this.countdown = new Countdown();
    this.conversation = new Conversation($("turns"), $("empty-log"));
    this.live = false;
    this.paused = false;
    this.dropAudio = false; // from a clear until the next response: in-flight packets are stale
    this.closedReason = null;
    this.hungUp = false;
    this.warnedBadAudio = false;
  }

  async start() {
    setState("connecting");
    setButtons({ connected: true });
    // The player's AudioContext is made before the first await, inside the click that started the call:
    // browsers only let a page make sound after a user gesture.
    this.player = new Player(stats, note);
    const playerReady = this.player.start(200);
    playerReady.catch(() => {}); // awaited below; a call that fails earlier must not leave it unhandled
    const [encode, decode] = await Promise.all([canEncodeOpus(), canDecodeOpus()]);
    this.format = encode ? "opus" : "pcm16";
    stats.inputFormat = this.format;
    if (!encode) {
      note("This browser has no WebCodecs Opus encoder (AudioEncoder): sending uncompressed 16 kHz audio instead.");
    }
    if (!decode) {
      note("This browser has no WebCodecs Opus decoder (AudioDecoder): reply playback is unavailable; replies show as text only.");
    }
    this.mic = new Mic({
      format: this.format,
      onPacket: (packet) => this.sendAudio(packet),
      onLevel: showLevel,
      onError: note,
    });
    this.mic.muted = true; // nothing is sent before a worker is ours
    try {
      await this.mic.start();
    } catch (err) {
      throw new Error(micProblem(err));
    }
    await playerReady;
    if (!decode) {
      this.player.stop();
      this.player = null;
    }
    if (this.hungUp) return this.onSocketClose({ code: 1000 }); // hung up while the microphone opened
    this.ws = new WebSocket(socketUrl(this.apiKey));
    this.ws.binaryType = "arraybuffer";
    this.ws.onmessage = (event) => this.onMessage(event.data);
    this.ws.onclose = (event) => this.onSocketClose(event);
  }

  send(event) {
    if (this.ws?.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(event));
  }

  sendAudio(packet) {
    if (!this.live || this.paused || this.ws?.readyState !== WebSocket.OPEN) return;
    this.ws.send(this.format === "opus" ? packPacket(packet) : packet);
    stats.packetsSent += 1;
  }

  onMessage(data) {
    if (typeof data !== "string") return this.onAudio(new Uint8Array(data));
    let event;
    try {
      event = JSON.parse(data);
    } catch {
      return note("The server sent a message this page cannot read.");
    }
    this.onEvent(event);
  }

  onAudio(bytes) {
    if (this.dropAudio) return;
    const { packets, errors } = this.parser.feed(bytes);
    stats.framingErrors += errors.length;
    if (this.parser.broken && !this.warnedBadAudio) {
      this.warnedBadAudio = true;
      note("The server's audio could not be read (not length-prefixed Opus packets), so replies cannot play.");
    }
    stats.packetsReceived += packets.length;
    if (this.player) for (const packet of packets) this.player.push(packet);
  }

  onEvent(ev) {
    switch (ev.type) {
      case "session.queued":
      case "session.queue_update":
        return this.onQueue(ev);
      case "session.queue_done":
        this.leaveQueue();
        return setState("connecting", "A voice engine is free — connecting…");
      case "session.created":
        return this.onCreated(ev.session);
      case "session.updated":
        return this.showVoices(ev.session);
      case "input_audio_buffer.speech_started":
        return activity("Hearing you…");
      case "input_audio_buffer.speech_stopped":
        return activity("Thinking…");
      case "conversation.item.input_audio_transcription.completed":
        return this.conversation.user(ev.transcript);
      case "response.created":
        this.dropAudio = false;
        this.parser.reset();
        activity("Answering…");
        return this.conversation.startReply(ev.response_id);
      case "response.output_text.delta":
        return this.conversation.delta(ev.response_id, ev.delta);
      case "response.output_audio.clear":
        return this.onClear(ev);
      case "response.done":
        this.player?.endOfResponse();
        activity("Listening…");
        return this.conversation.done(ev);
      case "session.paused":
      case "session.resumed":
        return this.showPaused(ev.type === "session.paused");
      case "session.closed":
        this.closedReason = ev.reason;
        return;
      case "error":
        return this.onError(ev);
      default:
        return; // newer server events this page does not know are ignored
    }
  }

  onQueue(ev) {
    const moved = stats.queuePosition !== ev.position;
    stats.queuePosition = ev.position;
    if (moved) setState("queued", `Waiting in line (number ${ev.position})`);
    this.countdown.update(ev.position, ev.eta_s);
    $("queue").hidden = false;
    this.countdown.start((text, remaining) => {
      $("queue").textContent = text;
      stats.etaSeconds = remaining;
    });
  }

  leaveQueue() {
    this.countdown.stop();
    $("queue").hidden = true;
    $("queue").textContent = "";
    stats.queuePosition = null;
    stats.etaSeconds = null;
  }

  onCreated(session) {
    this.leaveQueue();
    this.player?.setDelay(session.playback_delay_ms ?? 200);
    // Declared before the first audio byte, so the server never has to guess the format.
    if (this.format === "pcm16") this.send({ type: "session.update", session: { audio_format: "pcm16" } });
    this.showVoices(session);
    this.live = true;
    this.mic.muted = false;
    setState("live");
    setButtons({ live: true, connected: true });
    activity("Listening — go ahead and speak.");
  }

  onClear(ev) {
    this.player?.clear();
    this.dropAudio = true;
    this.parser.reset();
    this.conversation.interrupted(ev.response_id);
  }

  onError(ev) {
    note(ERROR_HELP[ev.code] ?? `Server error (${ev.code}): ${ev.message}`);
    if (ev.fatal) setState("error");
  }

  showVoices(session) {
    const voices = session.voices ?? [];
    $("voice-field").hidden = voices.length < 2;
    const select = $("voice");
    if (select.options.length !== voices.length || voices.some((v, i) => select.options[i].value !== v)) {
      select.replaceChildren(...voices.map((v) => new Option(v, v)));
    }
    if (session.voice) select.value = session.voice;
    stats.voice = session.voice ?? null;
  }

  showPaused(paused) {
    this.paused = paused;
    this.mic.muted = paused;
    $("pause").textContent = paused ? "Resume" : "Pause";
    $("pause").setAttribute("aria-pressed", String(paused));
    setState(paused ? "paused" : "live");
    activity(paused ? "Paused: the assistant is not listening." : "Listening…");
  }

  togglePause() {
    // Stop sending at once (privacy); the button flips when the server confirms.
    if (!this.paused) this.mic.muted = true;
    this.send({ type: this.paused ? "session.resume" : "session.pause" });
  }

  hangUp() {
    this.hungUp = true;
    setState("closing");
    if (this.live) {
      this.send({ type: "session.close" });
      // The server closes the socket after session.closed; do it ourselves if it does not.
      setTimeout(() => this.ws?.close(), 2000);
    } else {
      this.ws?.close(); // leaving the queue: the gateway frees the ticket when the socket goes
    }
  }

  onSocketClose(event) {
    const wasLive = this.live;
    const state = stats.state;
    this.stop();
    if (state === "closing" || this.closedReason) {
      setState("closed", this.closedReason ? `Call ended (${this.closedReason.replaceAll("_", " ")})` : undefined);
    } else if (state !== "error") {
      setState("error");
      note(
        wasLive
          ? `The connection dropped (code ${event.code}). Press Start talking to reconnect.`
          : `Could not connect to the server (code ${event.code}). If it needs an API key, enter it under Settings.`,
      );
    }
  }

  stop() {
    this.live = false;
    this.leaveQueue();
    this.mic?.stop();
    this.player?.stop();
    this.ws?.close();
    $("level").value = 0;
    activity("");
    setButtons();
    if (call === this) call = null;
  }
}

let call = null;

async function startCall() {
  $("message").replaceChildren();
  if (!window.isSecureContext) {
    note("The microphone and the audio codecs need a secure page: open this page over https:// (or on localhost).");
  }
  call = new Call($("api-key").value.trim());
  try {
    await call.start();
  } catch (err) {
    note(err.message);
    call?.stop();
    setState("error");
  }
}

function init() {
  const key = new URLSearchParams(location.search).get("api_key");
  if (key) $("api-key").value = key;
  $("start").addEventListener("click", startCall);
  // Enter in the API key field starts the call instead of reloading the page.
  $("settings").addEventListener("submit", (e) => {
    e.preventDefault();
    if (!call) startCall();
  });
  $("pause").addEventListener("click", () => call?.togglePause());
  $("interrupt").addEventListener("click", () => call?.send({ type: "response.cancel" }));
  $("hangup").addEventListener("click", () => call?.hangUp());
  $("voice").addEventListener("change", (e) => call?.send({ type: "session.update", session: { voice: e.target.value } }));
  setButtons();
}

init();
