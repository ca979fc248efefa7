"""Configuration: pydantic models for every section, loaded with precedence CLI > config.json > defaults.

Every field has a default here; ``config.example.json`` lists them all and a test keeps it in step.
An unknown key, a wrong type or an out-of-range value is a one-line ``ConfigError`` naming the field.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, IPvAnyNetwork, ValidationError

StackName = Literal["auto", "embedded", "production", "fake"]
TurnDetectionType = Literal["server_vad", "semantic_vad"]
Eagerness = Literal["low", "medium", "high", "auto"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=True)


class ModelConfig(_Section):
    """Which models a worker serves and how it runs them."""

    stack: StackName = "auto"  # auto: production with a GPU, embedded without
    asr_path: str = "openai/whisper-medium"
    # auto: CTranslate2 for the embedded CPU stack (it encodes only the clip's length), transformers otherwise
    asr_engine: Literal["auto", "transformers", "ctranslate2"] = "auto"
    llm_path: str = "Qwen/Qwen2.5-7B-Instruct"
    # auto: CTranslate2 int8 for the embedded CPU stack (≈4x faster a token there), transformers otherwise
    llm_engine: Literal["auto", "transformers", "ctranslate2"] = "auto"
    tts: Literal["auto", "piper", "cosyvoice2"] = "auto"
    tts_path: str = "FunAudioLLM/CosyVoice2-0.5B"
    embedded_dir: str = "data/models"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = "auto"
    compile: bool = False
    language: str | None = None  # None: detect per utterance
    max_new_tokens: int = Field(200, ge=1, le=4096)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    cpu_threads: int = Field(0, ge=0, le=256)  # 0: let torch decide


class AudioConfig(_Section):
    """Audio formats and buffering."""

    input_sample_rate: Literal[16000] = 16000
    output_sample_rate: Literal[24000] = 24000
    frame_ms: Literal[20] = 20
    output_bitrate: int = Field(32000, ge=6000, le=128000)
    playback_delay_ms: int = Field(200, ge=0, le=5000)
    ring_buffer_s: float = Field(60.0, gt=0, le=3600)
    ref_audio_path: str | None = None
    max_upload_mb: float = Field(50.0, gt=0, le=4096)
    max_audio_s: float = Field(600.0, gt=0, le=86400)


class ServiceConfig(_Section):
    """Ports, queue and ETA settings of the gateway and workers."""

    gateway_host: str = "0.0.0.0"
    gateway_port: int = Field(8006, ge=1, le=65535)
    worker_host: str = "127.0.0.1"
    worker_base_port: int = Field(22400, ge=1, le=65535)
    http: bool = False  # serve plain HTTP instead of HTTPS
    api_key: str | None = None
    # Shared by the gateway and its workers (see core/worker_auth.py); None: DUPLEX_WORKER_SECRET, else the
    # file data_dir/worker_secret made on first start. Set the same value on every host of a cluster.
    worker_secret: str | None = None
    # TLS between the gateway and its workers (for workers on other hosts): workers serve HTTPS/WSS with
    # worker_tls_cert/key, or a self-signed pair made under data_dir/tls-worker/; the gateway verifies them
    # against worker_ca_file (a PEM: the workers' certificate or their CA), else data_dir/tls-worker/cert.pem
    # where it exists (workers on this host), else the system's trusted CAs.
    worker_tls: bool = False
    worker_tls_cert: str | None = None
    worker_tls_key: str | None = None
    worker_ca_file: str | None = None
    max_queue_size: int = Field(1000, ge=1, le=1_000_000)
    request_timeout: float = Field(300.0, gt=0)
    queue_update_interval_s: float = Field(3.0, gt=0, le=60)
    health_interval_s: float = Field(2.0, gt=0, le=60)
    data_dir: str = "data"
    log_dir: str = "tmp"
    eta_chat_s: float = Field(15.0, gt=0)
    eta_streaming_s: float = Field(20.0, gt=0)
    eta_audio_duplex_s: float = Field(120.0, gt=0)
    eta_transcribe_s: float = Field(10.0, gt=0)
    eta_speech_s: float = Field(5.0, gt=0)
    eta_ema_alpha: float = Field(0.3, gt=0, le=1)
    eta_ema_min_samples: int = Field(3, ge=1)
    jobs_keep_last: int = Field(1000, ge=0)  # transcription jobs kept; 0 keeps all
    jobs_keep_days: float = Field(30.0, ge=0)  # days a finished job is kept; 0 keeps forever
    # A client must send a request's complete head within this long (of connecting, or of its first byte on a
    # kept-alive connection), and finish a TLS handshake within this long, or it is dropped.
    header_timeout_s: float = Field(10.0, gt=0, le=300)
    tls_handshake_timeout_s: float = Field(10.0, gt=0, le=300)
    # A request body's next part must come within this long, or the request gets 408 (on gateway and workers);
    # the rest of a body answered without being read must all come within this long, or the connection closes.
    body_read_timeout_s: float = Field(30.0, gt=0, le=600)
    # Open connections one client address (IPv6: one /64) may hold at the gateway; 0: no bound.
    max_connections_per_address: int = Field(64, ge=0)
    # Client networks that bound does not apply to: loopback, where a local reverse proxy connects from.
    connection_limit_exempt: tuple[IPvAnyNetwork, ...] = (
        ipaddress.IPv4Network("127.0.0.0/8"),
        ipaddress.IPv6Network("::1/128"),
    )


class EagernessLevel(_Section):
    """How ``semantic_vad`` ends a turn at one eagerness.

    Two judges look at the utterance at a pause: the turn model hears it (P(complete) from the audio) and the
    LLM reads its transcript (P(the message ends here)). Both sure: the turn ends at the pause. The words
    alone sure: it ends after ``text_silence_ms``. Otherwise only ``max_silence_ms`` of silence ends it.
    """

    threshold: float = Field(gt=0, lt=1)  # the turn model's P(complete) that counts as sure
    text_threshold: float = Field(ge=0, lt=1)  # the LLM's P(message ends here) that counts as finished words
    text_silence_ms: int = Field(ge=100, le=10000)  # words finished, audio unsure: end after this silence
    max_silence_ms: int = Field(ge=100, le=10000)  # otherwise end after this much silence


class DuplexConfig(_Section):
    """Turn-taking and barge-in of a live session."""

    vad_threshold: float = Field(0.5, gt=0, lt=1)
    # server_vad: a fixed silence (endpoint_silence_ms) ends the turn; semantic_vad: the turn model decides
    turn_detection: TurnDetectionType = "semantic_vad"
    eagerness: Eagerness = "auto"  # auto is medium
    # Silence after speech before the turn model is asked and a preemptive reply starts.
    pause_check_ms: int = Field(200, ge=60, le=2000)
    eagerness_low: EagernessLevel = EagernessLevel(
        threshold=0.8, text_threshold=0.02, text_silence_ms=1000, max_silence_ms=2000
    )
    eagerness_medium: EagernessLevel = EagernessLevel(
        threshold=0.5, text_threshold=0.012, text_silence_ms=600, max_silence_ms=1200
    )
    eagerness_high: EagernessLevel = EagernessLevel(
        threshold=0.3, text_threshold=0.008, text_silence_ms=400, max_silence_ms=800
    )
    # Start ASR -> LLM -> TTS at the pause, sending nothing until the turn is confirmed.
    preemptive_reply: bool = True
    # Transcribe the audio so far every this much speech; its agreed words prefix the final pass (0: off).
    asr_partial_interval_ms: int = Field(0, ge=0, le=10000)
    endpoint_silence_ms: int = Field(500, ge=100, le=5000)  # server_vad's silence
    min_speech_ms: int = Field(200, ge=0, le=5000)
    barge_in_min_speech_ms: int = Field(250, ge=0, le=5000)
    max_utterance_s: float = Field(30.0, gt=0, le=30)
    pause_timeout: float = Field(60.0, gt=0)
    idle_timeout: float = Field(600.0, gt=0)
    # A client that sends nothing at all (not even silence frames) for this long is gone or stuck: its
    # session ends with an error event and the worker is free for the next client. A paused session is
    # exempt (it has pause_timeout).
    receive_timeout_s: float = Field(30.0, gt=0, le=3600)
    instructions: str = (
        "You are a helpful voice assistant. Answer in one or two short spoken sentences, "
        "without lists or markdown."
    )
    voice: str | None = None
    history_max_turns: int = Field(8, ge=0, le=1000)
    history_max_chars: int = Field(6000, ge=100)
    send_queue_packets: int = Field(500, ge=10)
    # Recordings hold what users said: the server's config turns them on for every session; a client may
    # turn its own session's recording on or off with session.update only where this allows it.
    record: bool = False
    client_recording: bool = False

    def level(self, eagerness: Eagerness | None = None) -> EagernessLevel:
        """The thresholds of an eagerness (``auto`` and None: this config's eagerness, auto meaning medium)."""
        name = eagerness or self.eagerness
        return {"low": self.eagerness_low, "high": self.eagerness_high}.get(name, self.eagerness_medium)


class DistillConfig(_Section):
    """Batch transcription."""

    batch_size: int = Field(8, ge=1, le=1024)
    max_segment_s: float = Field(30.0, gt=0, le=30)
    min_silence_ms: int = Field(300, ge=0)
    decode_workers: int = Field(2, ge=1, le=64)
    max_file_s: float = Field(4 * 3600.0, gt=0)
    language: str | None = None


class Config(_Section):
    """The whole configuration."""

    model: ModelConfig = ModelConfig()
    audio: AudioConfig = AudioConfig()
    service: ServiceConfig = ServiceConfig()
    duplex: DuplexConfig = DuplexConfig()
    distill: DistillConfig = DistillConfig()


class ConfigError(ValueError):
    """A configuration problem, with a one-line message naming the field."""


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "(root)"
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"{source}: unknown key '{field}'"
    return f"{source}: {field}: {first['msg']} (got {first.get('input')!r})"


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Build the config: defaults, then the JSON file (``config.json`` if present and none given), then CLI overrides.

    ``overrides`` is nested by section: ``{"service": {"gateway_port": 9000}}``; None values are ignored so that
    unset CLI flags do not mask the file.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    file = Path(path) if path is not None else Path("config.json")
    if path is not None or file.exists():
        source = str(file)
        try:
            loaded = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{file}: config file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{file}: not valid JSON ({exc})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{file}: the top level must be a JSON object")
        data = {k: v for k, v in loaded.items() if not k.startswith("_")}
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None
    if overrides:
        clean = {s: {k: v for k, v in d.items() if v is not None} for s, d in overrides.items()}
        try:
            config = Config.model_validate(_merge(config.model_dump(), clean))
        except ValidationError as exc:
            raise ConfigError(_format_error(exc, "command line")) from None
    return config


def example_config() -> dict[str, Any]:
    """Every field with its default, as written to ``config.example.json``."""
    return Config().model_dump(mode="json")
