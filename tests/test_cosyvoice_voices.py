"""The reference-voice registry (core/storage/ref_audio.py) and its /v1/voices routes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from fastapi import FastAPI
from fastapi.testclient import TestClient

from core.storage.ref_audio import RefAudioError, RefAudioRegistry
from core.worker.ref_audio_routes import build_ref_audio_router, connect_voices
from tests.speech import espeak, with_silence


def wav_bytes(audio: np.ndarray, rate: int = 16000, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def speech() -> bytes:
    return wav_bytes(espeak("Hello, this is my reference voice."))


class FakeTTS:
    """Records what the routes hand the TTS; refuses recordings named 'refused'."""

    def __init__(self) -> None:
        self.voices: tuple[str, ...] = ("default",)
        self.added: list[tuple[str, Path, str | None]] = []
        self.voice_resolver = None

    def add_voice(self, name: str, path: Path, text: str | None = None) -> None:
        if name == "refused":
            raise ValueError("no speech tokens")
        assert path.is_file()
        self.added.append((name, path, text))
        self.voices = (*self.voices, name)

    def remove_voice(self, name: str) -> bool:
        self.voices = tuple(v for v in self.voices if v != name)
        return True


def test_cosyvoice_registry_stores_and_reloads_voices(tmp_path: Path, speech: bytes) -> None:
    reg = RefAudioRegistry(tmp_path)
    voice = reg.add("alice", speech, text="  Hello, this is my reference voice. ")
    assert voice.text == "Hello, this is my reference voice."
    assert 1.0 < voice.duration_s < 5.0
    audio, rate = sf.read(tmp_path / "alice.wav")
    assert rate == 24000 and abs(len(audio) / rate - voice.duration_s) < 0.01
    again = RefAudioRegistry(tmp_path)  # a restarted worker sees the same voices
    assert [v.name for v in again.voices()] == ["alice"]
    assert again.resolve("alice") == (tmp_path / "alice.wav", "Hello, this is my reference voice.")
    assert again.resolve("bob") is None
    again.remove("alice")
    assert not (tmp_path / "alice.wav").exists()
    assert RefAudioRegistry(tmp_path).voices() == []


def test_cosyvoice_registry_keeps_voices_readable_by_the_service_user_only(
    tmp_path: Path, speech: bytes
) -> None:
    root = tmp_path / "ref_audio"
    root.mkdir(mode=0o755)
    RefAudioRegistry(root).add("alice", speech, text="Hello.")
    assert root.stat().st_mode & 0o777 == 0o700
    assert {p.name: p.stat().st_mode & 0o777 for p in root.iterdir()} == {
        "alice.wav": 0o600,
        "registry.json": 0o600,
    }


@pytest.mark.parametrize(
    "name", ["../evil", "a/b", "..", ".hidden", "x" * 65, "", "a b", "nul\x00", "C:\\x", "default"]
)
def test_cosyvoice_registry_rejects_path_tricks_in_names(tmp_path: Path, speech: bytes, name: str) -> None:
    reg = RefAudioRegistry(tmp_path / "voices")
    with pytest.raises(RefAudioError) as err:
        reg.add(name, speech)
    assert err.value.kind == "bad_name"
    assert not (tmp_path / "evil.wav").exists() and list(tmp_path.rglob("*.wav")) == []


def test_cosyvoice_registry_validates_the_audio(tmp_path: Path, speech: bytes) -> None:
    reg = RefAudioRegistry(tmp_path)
    cases = {
        "short": wav_bytes(espeak("Hi")[:8000]),  # 0.5 s
        "long": wav_bytes(with_silence(espeak("Hello there."), 31.0, 1.0)),
        "silent": wav_bytes(np.zeros(48000, dtype=np.float32)),
        "garbage": b"RIFF....WAVEfmt definitely not audio",
        "empty": b"",
    }
    for name, data in cases.items():
        with pytest.raises(RefAudioError) as err:
            reg.add(name, data)
        assert err.value.kind == "bad_audio", name
    assert reg.voices() == [] and list(tmp_path.glob("*.wav")) == []
    flac = reg.add("flac", wav_bytes(espeak("A different format works too."), 22050, "FLAC"))
    assert flac.duration_s > 1.0


def test_cosyvoice_registry_refuses_overwrite_unless_asked(tmp_path: Path, speech: bytes) -> None:
    reg = RefAudioRegistry(tmp_path)
    reg.add("carol", speech, text="first")
    with pytest.raises(RefAudioError) as err:
        reg.add("carol", speech, text="second")
    assert err.value.kind == "exists"
    assert reg.add("carol", speech, text="second", replace=True).text == "second"
    small = RefAudioRegistry(tmp_path / "small", max_upload_bytes=1000)
    with pytest.raises(RefAudioError) as err:
        small.add("big", speech)
    assert err.value.kind == "too_large"


def test_cosyvoice_registry_survives_a_corrupt_index(tmp_path: Path, speech: bytes) -> None:
    RefAudioRegistry(tmp_path).add("dave", speech)
    (tmp_path / "registry.json").write_text("{not json")
    reg = RefAudioRegistry(tmp_path)
    assert reg.voices() == []
    assert list(tmp_path.glob("registry.json.unreadable-*"))  # kept aside, not deleted
    reg.add("erin", speech)
    assert json.loads((tmp_path / "registry.json").read_text())["voices"].keys() == {"erin"}


@pytest.fixture
def client(tmp_path: Path) -> tuple[TestClient, RefAudioRegistry, FakeTTS]:
    registry = RefAudioRegistry(tmp_path, max_upload_bytes=2_000_000)
    tts = FakeTTS()
    app = FastAPI()
    app.include_router(build_ref_audio_router(registry, lambda: tts))
    return TestClient(app), registry, tts


def test_cosyvoice_voice_routes_upload_list_delete(
    client: tuple[TestClient, RefAudioRegistry, FakeTTS], speech: bytes
) -> None:
    http, registry, tts = client
    r = http.post(
        "/v1/voices",
        data={"name": "frank", "text": "Hello."},
        files={"file": ("frank.wav", speech, "audio/wav")},
    )
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "frank" and r.json()["text"] == "Hello." and "file" not in r.json()
    assert tts.added == [("frank", registry.path(registry.get("frank")), "Hello.")]
    body = http.get("/v1/voices").json()
    assert [v["name"] for v in body["voices"]] == ["frank"] and body["model_voices"] == ["default"]
    r = http.post("/v1/voices", data={"name": "frank"}, files={"file": ("f.wav", speech, "audio/wav")})
    assert r.status_code == 409 and r.json()["error"]["code"] == "invalid_event"
    r = http.post(
        "/v1/voices",
        data={"name": "frank", "replace": "true"},
        files={"file": ("f.wav", speech, "audio/wav")},
    )
    assert r.status_code == 201
    assert http.delete("/v1/voices/frank").status_code == 204
    assert "frank" not in tts.voices and registry.voices() == []
    r = http.delete("/v1/voices/frank")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_cosyvoice_voice_routes_reject_bad_uploads(
    client: tuple[TestClient, RefAudioRegistry, FakeTTS], speech: bytes
) -> None:
    http, registry, tts = client
    cases = [
        ({"name": "../../etc/passwd"}, ("x.wav", speech), 400, "invalid_event"),
        ({"name": "ok"}, ("x.wav", b"garbage bytes"), 400, "bad_audio"),
        ({"name": "ok"}, ("x.wav", wav_bytes(np.zeros(32000, np.float32))), 400, "bad_audio"),
        ({"name": "refused"}, ("x.wav", speech), 400, "bad_audio"),  # the TTS could not use it: nothing kept
        ({"name": "big"}, ("x.wav", b"\0" * 2_100_000), 413, "payload_too_large"),
    ]
    for form, (fname, data), status, code in cases:
        r = http.post("/v1/voices", data=form, files={"file": (fname, data, "audio/wav")})
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (form, r.text)
    assert http.post("/v1/voices", data={"name": "nofile"}).status_code in (400, 415)
    assert http.post("/v1/voices", json={"name": "x"}).status_code == 415
    assert http.delete("/v1/voices/..%2F..%2Fregistry").status_code in (400, 404)
    assert registry.voices() == [] and tts.added == []
    assert list(registry.root.glob("*.wav")) == []


def test_cosyvoice_connect_voices_sets_the_resolver(tmp_path: Path, speech: bytes) -> None:
    registry = RefAudioRegistry(tmp_path)
    registry.add("gina", speech, text="Hi.")
    tts = FakeTTS()
    connect_voices(tts, registry)
    assert tts.voice_resolver is not None
    assert tts.voice_resolver("gina") == (tmp_path / "gina.wav", "Hi.")
    connect_voices(object(), registry)  # a TTS without voices is left alone
