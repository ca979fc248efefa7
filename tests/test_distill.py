"""Distillation, the pure parts: manifests, sharding, the resumable writer, repetition cuts, merging, and the
pipeline's batching and aggregation with a fake ASR, a scripted loader and a scripted segmenter.

``FakeASR`` and ``make_fake_asr`` are also used by the other distill tests (and, by name, by the CLI's
``--asr-factory`` in a subprocess).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.audio.errors import AudioFileError
from core.distill import merge as merge_cli
from core.distill.manifest import ManifestError, ManifestItem, read_manifest
from core.distill.pipeline import (
    ClipBatcher,
    DistillOptions,
    FileResult,
    merge_segments,
    split_long,
    transcribe_files,
)
from core.distill.shard import ShardError, merge_outputs, parse_shard, select_shard, shard_of
from core.distill.text import collapse_repetitions
from core.distill.writer import OutputError, ResultWriter, iter_rows, scan
from core.models.base import Segment, Transcript

RATE = 16_000


# --------------------------------------------------------------------------------------- fakes


class FakeASR:
    """Says each clip's length in samples ("n16000"); scripted failures, texts and a per-batch delay."""

    name = "fake"

    def __init__(
        self,
        *,
        texts: dict[int, str] | None = None,
        poison: int | None = None,
        delay_s: float = 0.0,
        split: bool = False,
    ) -> None:
        self.texts = texts or {}
        self.poison = poison
        self.delay_s = delay_s
        self.split = split
        self.batches: list[list[int]] = []
        self.lock = threading.Lock()

    def _one(self, audio: np.ndarray, language: str | None) -> Transcript:
        n = int(audio.size)
        text = self.texts.get(n, f"n{n}")
        d = n / RATE
        if self.split and text:
            half = [Segment(0.0, d / 2, f"{text}a"), Segment(d / 2, d, f"{text}b")]
            return Transcript(f"{text}a {text}b", language or "en", tuple(half))
        return Transcript(text, language or "en", (Segment(0.0, d, text),) if text else ())

    def transcribe(self, audio: np.ndarray, language: str | None = None) -> Transcript:
        return self.transcribe_batch([audio], language)[0]

    def transcribe_batch(self, audios: Sequence[np.ndarray], language: str | None = None) -> list[Transcript]:
        if language == "zz":
            raise ValueError("unknown language 'zz'")
        with self.lock:
            self.batches.append([int(a.size) for a in audios])
        if self.poison is not None and any(a.size == self.poison for a in audios):
            raise RuntimeError("poisoned clip")
        if self.delay_s:
            time.sleep(self.delay_s)  # gives a killer something to interrupt; nothing asserts on time
        return [self._one(a, language) for a in audios]

    def warmup(self) -> None:
        pass


def make_fake_asr(config: object) -> FakeASR:
    """``--asr-factory tests.test_distill:make_fake_asr``: a fake that takes a moment per batch."""
    return FakeASR(delay_s=float(os.environ.get("FAKE_ASR_DELAY_S", "0")))


def tone(seconds: float, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (amplitude * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


class Script:
    """A loader and a segmenter driven by a table: path -> (audio seconds, speech segments) or an error."""

    def __init__(self, table: dict[str, tuple[float, list[tuple[float, float]]] | Exception]) -> None:
        self.table = table
        self.by_size: dict[int, list[tuple[float, float]]] = {}

    def load(self, path: str) -> np.ndarray:
        entry = self.table[Path(path).name]
        if isinstance(entry, Exception):
            raise entry
        seconds, segments = entry
        audio = tone(seconds)
        self.by_size[audio.size] = segments
        return audio

    def segment(self, audio: np.ndarray) -> list[tuple[float, float]]:
        return self.by_size[audio.size]


def run(items, asr, table, **opts) -> dict[str, FileResult]:
    script = Script(table)
    options = DistillOptions(**{"decode_workers": 2, **opts})
    results = list(transcribe_files(items, asr, options, loader=script.load, segmenter=script.segment))
    assert len(results) == len(items)
    return {r.id: r for r in results}


def items_for(*names: str) -> list[ManifestItem]:
    return [ManifestItem(n, f"/data/{n}") for n in names]


# ------------------------------------------------------------------------------------ manifest


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_manifest_rows_bare_paths_and_bad_rows(tmp_path: Path) -> None:
    m = write(
        tmp_path / "m.jsonl",
        "\n".join(
            [
                '{"id": "a", "path": "audio/a.wav"}',
                "# a comment, then a blank line",
                "",
                "b.mp3",
                '"c d.flac"',
                '{"path": "/abs/e.wav"}',
                '{"id": 7, "path": "seven.wav"}',
                '{"id": "a", "path": "again.wav"}',
                '{"id": "nopath"}',
                '{"id": "badpath", "path": 3}',
                '{"id": "", "path": "x.wav"}',
                '{"id": true, "path": "x.wav"}',
                '{"id": "bell\\u0007", "path": "x.wav"}',
                '{"id": null, "path": "x.wav"}',
                '{"id": "broken", "path": ',
                "[1, 2]",
                "{}",
            ]
        ),
    )
    man = read_manifest(m)
    got = [(i.id, i.path, i.error) for i in man.items]
    assert got == [
        ("a", str(tmp_path / "audio/a.wav"), None),
        ("b.mp3", str(tmp_path / "b.mp3"), None),
        ("c d.flac", str(tmp_path / "c d.flac"), None),
        ("/abs/e.wav", "/abs/e.wav", None),
        ("7", str(tmp_path / "seven.wav"), None),
        ("nopath", "", "the row has no 'path'"),
        ("badpath", "", "the path must be a string, got int"),
    ]
    problems = [str(p) for p in man.problems]
    assert problems == [
        "line 8: duplicate id 'a' (first at line 1)",
        "line 11: the id is empty",
        "line 12: the id must be a string",
        "line 13: the id contains control characters",
        "line 14: the row has no id",
        "line 15: not valid JSON (Expecting value)",
        "line 16: a row must be an object or a path, got list",
        "line 17: the row has no id",
    ]


def test_directory_manifest_finds_audio_and_video_recursively(tmp_path: Path) -> None:
    for rel in [
        "b.wav",
        "sub/a.MP4",
        "sub/deeper/c.flac",
        "notes.txt",
        ".hidden.wav",
        ".cache/x.wav",
        "d.mkv",
    ]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    man = read_manifest(tmp_path)
    assert [i.id for i in man.items] == ["b.wav", "d.mkv", "sub/a.MP4", "sub/deeper/c.flac"]
    assert man.items[2].path == str(tmp_path / "sub/a.MP4")
    assert man.problems == ()


def test_parquet_manifest_with_and_without_ids(tmp_path: Path) -> None:
    pq.write_table(
        pa.table({"id": ["x", "y", "x", None], "path": ["x.wav", None, "x2.wav", "z.wav"]}),
        tmp_path / "m.parquet",
    )
    man = read_manifest(tmp_path / "m.parquet")
    assert [(i.id, i.error) for i in man.items] == [("x", None), ("y", "the row has no 'path'")]
    assert [str(p) for p in man.problems] == [
        "row 3: duplicate id 'x' (first at row 1)",
        "row 4: the row has no id",
    ]
    # The format is found by content, not name; without an id column the path is the id.
    pq.write_table(pa.table({"path": ["/a.wav", "b.wav"]}), tmp_path / "paths.data")
    assert [i.id for i in read_manifest(tmp_path / "paths.data").items] == ["/a.wav", "b.wav"]
    pq.write_table(pa.table({"file": ["a.wav"]}), tmp_path / "wrong.parquet")
    with pytest.raises(ManifestError, match="needs a 'path' column"):
        read_manifest(tmp_path / "wrong.parquet")


def test_unreadable_manifests_raise_manifest_error(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no such manifest"):
        read_manifest(tmp_path / "absent.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(b"caf\xe9.wav\n")
    with pytest.raises(ManifestError, match="not UTF-8"):
        read_manifest(tmp_path / "latin1.jsonl")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 but not really")
    with pytest.raises(ManifestError, match="not a readable Parquet file"):
        read_manifest(tmp_path / "bad.parquet")


# ------------------------------------------------------------------------------------ sharding


@pytest.mark.parametrize(
    ("spec", "want"), [("0/1", (0, 1)), ("3/4", (3, 4)), ("0/4", (0, 4))]
)  # fmt: skip
def test_parse_shard_accepts_i_of_n(spec: str, want: tuple[int, int]) -> None:
    assert parse_shard(spec) == want


@pytest.mark.parametrize("spec", ["4/4", "-1/4", "1", "a/b", "1/0", "", "1/2/3"])
def test_parse_shard_rejects_the_rest(spec: str) -> None:
    with pytest.raises(ShardError):
        parse_shard(spec)


def test_shards_partition_ids_stably_and_evenly() -> None:
    ids = [f"clip-{i:05d}" for i in range(8000)]
    items = [ManifestItem(i, i) for i in ids]
    shards = [select_shard(items, k, 4) for k in range(4)]
    assert sorted(i.id for s in shards for i in s) == ids  # every id in exactly one shard
    assert all(1900 <= len(s) <= 2100 for s in shards)
    # Reordering the manifest changes no id's shard (hash of the id, not its row).
    assert select_shard(list(reversed(items)), 2, 4) == list(reversed(shards[2]))
    # Fixed values: the same on every machine, process and Python version (no salted hash()).
    assert [shard_of("a", 4), shard_of("clip-00001", 4), shard_of("ümlaut/ид", 7)] == [3, 1, 2]
    assert [shard_of("a", 1000), shard_of("b", 1000)] == [343, 333]


# -------------------------------------------------------------------------------------- writer


def row(item_id: str, status: str = "ok", text: str = "hi") -> dict:
    r = {
        "id": item_id,
        "path": f"/{item_id}",
        "status": status,
        "duration_s": 1.0,
        "language": "en",
        "text": text,
        "segments": [],
    }
    if status == "error":
        r["error"] = "missing: no such file"
    return r


def test_writer_appends_and_resumes_with_the_ids_it_holds(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with ResultWriter(out) as w:
        w.write(row("a"))
        w.write(row("b", text="ünïcode ✓"))
        with pytest.raises(OutputError, match="already"):
            w.write(row("a"))
    with ResultWriter(out) as w:
        assert w.done == {"a", "b"}
        w.write(row("c"))
    assert [r["id"] for r in iter_rows(out)] == ["a", "b", "c"]
    assert json.loads(out.read_text(encoding="utf-8").splitlines()[1])["text"] == "ünïcode ✓"


@pytest.mark.parametrize("tail", [b'{"id": "c", "pa', b'{"id": "c"}', b"\x00\x00\x00", b'{"id": "c", "pa\n'])
def test_writer_cuts_a_torn_last_line_on_resume(tmp_path: Path, tail: bytes) -> None:
    out = tmp_path / "out.jsonl"
    with ResultWriter(out) as w:
        w.write(row("a"))
        w.write(row("b"))
    good = out.read_bytes()
    with out.open("ab") as fh:
        fh.write(tail)  # what a kill in the middle of a write (or a disk hiccup) leaves
    with ResultWriter(out) as w:
        assert w.repaired.torn_bytes == len(tail)
        assert w.done == {"a", "b"}
        assert out.read_bytes() == good
        w.write(row("c"))
    assert [r["id"] for r in iter_rows(out)] == ["a", "b", "c"]
    assert all(json.loads(line) for line in out.read_text().splitlines())


def test_writer_leaves_a_bad_middle_line_and_does_not_count_it(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_bytes(json.dumps(row("a")).encode() + b"\nnot json\n" + json.dumps(row("b")).encode() + b"\n")
    state = scan(out)
    assert (state.ids, state.rows, state.bad_lines, state.torn_bytes) == ({"a", "b"}, 2, 1, 0)


def test_writer_refuses_a_second_writer_and_nan(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with ResultWriter(out) as w:
        with pytest.raises(OutputError, match="another run"):
            ResultWriter(out).open()
        with pytest.raises(OutputError, match="cannot be written as JSON"):
            w.write({**row("n"), "duration_s": float("nan")})
    assert out.read_bytes() == b""
    with pytest.raises(OutputError, match="does not exist"):
        ResultWriter(tmp_path / "no" / "dir.jsonl").open()


# ----------------------------------------------------------------------------------------- merge


def test_merge_keeps_every_id_once_and_prefers_finished_rows(tmp_path: Path) -> None:
    s0, s1, out = tmp_path / "s0.jsonl", tmp_path / "s1.jsonl", tmp_path / "out.jsonl"
    with ResultWriter(s0) as w:
        w.write(row("a"))
        w.write(row("b", "error"))
    with ResultWriter(s1) as w:
        w.write(row("c", "no_speech", ""))
        w.write(row("b", "ok", "second try"))
    with s1.open("ab") as fh:
        fh.write(b'{"id": "d", "st')  # shard 1 was killed mid-row
    out.write_text(json.dumps(row("z")) + "\n")  # rows already in the output are kept
    report = merge_outputs(out, [s0, s1])
    rows = {r["id"]: r for r in iter_rows(out)}
    assert sorted(rows) == ["a", "b", "c", "z"]
    assert rows["b"]["text"] == "second try"
    assert (report.rows, report.duplicates, report.torn_or_bad) == (4, 1, 1)
    assert report.statuses == {"ok": 3, "no_speech": 1}
    # Merging again changes nothing: the merge is idempotent.
    before = out.read_bytes()
    merge_outputs(out, [s0, s1])
    assert out.read_bytes() == before


def test_merge_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s0 = tmp_path / "s0.jsonl"
    s0.write_text(json.dumps(row("a")) + "\n")
    assert merge_cli.main([str(tmp_path / "o.jsonl"), str(s0)]) == 0
    assert "merged 1 ids" in capsys.readouterr().out
    assert merge_cli.main([str(tmp_path / "o.jsonl"), str(s0), str(tmp_path / "gone.jsonl")]) == 1
    assert "input not found" in capsys.readouterr().err
    assert merge_cli.main([str(s0), str(s0)]) == 2


# ------------------------------------------------------------------------------- repetition cut


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("hello world", "hello world"),
        ("", ""),
        ("  spaced   out  ", "spaced out"),
        ("no, no, no", "no, no, no"),  # three is speech, not a loop
        ("very very very very very good", "very good"),
        ("Thank you. Thank you. Thank you. Thank you. Thank you.", "Thank you."),
        ("I said thank you thank you thank you thank you and left", "I said thank you and left"),
        ("a b c a b c a b c a b c a b c d", "a b c d"),
        ("The end. THE END! the end the end", "The end."),
        ("one two one two one two", "one two one two one two"),
        ("hahahahahahahahahahahahaha", "ha"),
        ("谢谢观看谢谢观看谢谢观看谢谢观看谢谢观看", "谢谢观看"),
        ("Gesundheitsversicherungsunternehmen", "Gesundheitsversicherungsunternehmen"),
        ("x y z x y z x y z x y z q x y z x y z x y z x y z", "x y z q x y z"),
    ],
)
def test_collapse_repetitions(text: str, want: str) -> None:
    assert collapse_repetitions(text) == want


# --------------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize(
    ("segments", "max_s", "want"),
    [
        ([(0.0, 10.0)], 30.0, [(0.0, 10.0)]),
        ([(0.0, 30.0)], 30.0, [(0.0, 30.0)]),
        ([(5.0, 65.0)], 30.0, [(5.0, 35.0), (35.0, 65.0)]),
        ([(0.0, 70.0)], 30.0, [(0.0, 70 / 3), (70 / 3, 140 / 3), (140 / 3, 70.0)]),
        ([(0.0, 1.0), (2.0, 33.0)], 30.0, [(0.0, 1.0), (2.0, 17.5), (17.5, 33.0)]),
    ],
)
def test_split_long(segments, max_s, want) -> None:
    got = split_long(segments, max_s)
    assert [x for pair in got for x in pair] == pytest.approx([x for pair in want for x in pair])
    assert all(b - a <= max_s + 1e-9 for a, b in got)


def test_clips_are_batched_across_files_and_times_offset() -> None:
    asr = FakeASR(split=True)
    table = {f"f{k}": (10.0 + k, [(1.0, 2.0), (3.0, 4.5), (6.0, 6.0 + 0.25 * (k + 1))]) for k in range(5)}
    got = run(items_for(*table), asr, table, batch_size=4, max_segment_s=2.0)  # 2 s: no two segments merge
    # 15 clips in batches of 4: the batches span file boundaries.
    assert [len(b) for b in asr.batches] == [4, 4, 4, 3]
    r = got["f2"]
    assert (r.status, r.duration_s, r.language, r.error) == ("ok", 12.0, "en", None)
    assert r.text == "n16000a n16000b n24000a n24000b n12000a n12000b"
    assert [(s.start, s.end) for s in r.segments] == [
        (1.0, 1.5),
        (1.5, 2.0),
        (3.0, 3.75),
        (3.75, 4.5),
        (6.0, 6.375),
        (6.375, 6.75),
    ]
    assert r.to_row()["segments"][0] == {"start": 1.0, "end": 1.5, "text": "n16000a"}
    assert "error" not in r.to_row()


def test_prefetch_and_inline_decoding_give_the_same_rows() -> None:
    table = {f"f{k}": (5.0, [(0.5, 1.0 + k * 0.25)]) for k in range(7)}
    ahead = run(items_for(*table), FakeASR(), table, batch_size=3, prefetch_files=4)
    inline = run(items_for(*table), FakeASR(), table, batch_size=1, prefetch_files=0)
    assert {k: v.to_row() for k, v in ahead.items()} == {k: v.to_row() for k, v in inline.items()}


def test_bad_files_become_error_rows_and_the_rest_still_run() -> None:
    table: dict = {
        "ok": (3.0, [(0.5, 2.5)]),
        "corrupt": AudioFileError("corrupt: unsupported or corrupt file (Invalid data)", kind="undecodable"),
        "gone": AudioFileError("gone: no such file", kind="missing"),
        "weird": RuntimeError("codec exploded"),
        "quiet": (4.0, []),
    }
    items = [*items_for(*table), ManifestItem("rowbad", "", "the row has no 'path'")]
    got = run(items, FakeASR(), table)
    assert {k: v.status for k, v in got.items()} == {
        "ok": "ok", "corrupt": "error", "gone": "error", "weird": "error", "quiet": "no_speech", "rowbad": "error",
    }  # fmt: skip
    assert got["corrupt"].error == "undecodable: corrupt: unsupported or corrupt file (Invalid data)"
    assert got["gone"].error == "missing: gone: no such file"
    assert got["weird"].error == "decode failure: RuntimeError: codec exploded"
    assert got["rowbad"].error == "bad manifest row: the row has no 'path'"
    quiet = got["quiet"].to_row()
    assert quiet == {
        "id": "quiet",
        "path": "/data/quiet",
        "status": "no_speech",
        "duration_s": 4.0,
        "language": None,
        "text": "",
        "segments": [],
    }
    assert got["gone"].to_row()["error"] == "missing: gone: no such file"


def test_an_asr_failure_fails_only_its_file() -> None:
    asr = FakeASR(poison=int(1.5 * RATE))
    table = {"a": (3.0, [(0.0, 1.0)]), "b": (3.0, [(0.0, 1.5)]), "c": (3.0, [(0.0, 2.0)])}
    got = run(items_for("a", "b", "c"), asr, table, batch_size=3)
    assert {k: v.status for k, v in got.items()} == {"a": "ok", "b": "error", "c": "ok"}
    assert got["b"].error == "asr failure: RuntimeError: poisoned clip"
    assert asr.batches[0] == [16000, 24000, 32000]  # the batch failed, then each clip ran alone


def test_no_text_without_speech() -> None:
    """Silent clips never reach the model; a clip the model hears nothing in gives no text."""
    asr = FakeASR(texts={int(1.0 * RATE): ""})

    class Silent(Script):
        def load(self, path: str) -> np.ndarray:
            audio = super().load(path)
            return np.zeros_like(audio) if "silent" in path else audio

    table = {"silent": (3.0, [(0.0, 2.0)]), "mute": (3.0, [(1.0, 2.0)])}
    script = Silent(table)
    results = list(
        transcribe_files(
            items_for("silent", "mute"), asr, DistillOptions(), loader=script.load, segmenter=script.segment
        )
    )
    assert {r.id: (r.status, r.text, r.segments) for r in results} == {
        "silent": ("no_speech", "", ()),
        "mute": ("no_speech", "", ()),
    }
    assert asr.batches == [[16000]]  # only the non-silent clip was sent


def test_repetition_loops_are_cut_in_texts_and_segments() -> None:
    loop = "Thank you. " * 12
    asr = FakeASR(texts={int(2.0 * RATE): "Hello there. " + loop, int(1.0 * RATE): "Thank you."})
    table = {"a": (9.0, [(0.0, 2.0), (3.0, 4.0), (4.5, 5.5), (6.0, 7.0), (8.0, 9.0)])}
    r = run(items_for("a"), asr, table, max_segment_s=2.0)["a"]
    assert r.text == "Hello there. Thank you. Thank you."
    assert [s.start for s in r.segments] == [0.0, 3.0]  # four "Thank you." segments in a row keep one


def test_language_is_the_one_heard_longest() -> None:
    class Polyglot(FakeASR):
        def _one(self, audio: np.ndarray, language: str | None) -> Transcript:
            return Transcript("hola", "es") if audio.size > 3 * RATE else Transcript("hi", "en")

    table = {"a": (20.0, [(0.0, 1.0), (2.0, 3.0), (4.0, 10.0)])}
    assert run(items_for("a"), Polyglot(), table, max_segment_s=6.0)["a"].language == "es"


@pytest.mark.parametrize(
    ("segments", "max_s", "want"),
    [
        ([], 30.0, []),
        ([(1.0, 2.0), (3.0, 4.0), (40.0, 41.0)], 30.0, [(1.0, 4.0), (40.0, 41.0)]),
        ([(0.0, 10.0), (12.0, 30.0), (30.5, 31.0)], 30.0, [(0.0, 30.0), (30.5, 31.0)]),
        ([(0.0, 1.0), (2.0, 3.0), (4.0, 5.0)], 3.0, [(0.0, 3.0), (4.0, 5.0)]),
        ([(0.0, 5.0)], 3.0, [(0.0, 5.0)]),  # merging never splits: split_long does that first
    ],
)
def test_merge_segments(segments, max_s, want) -> None:
    assert merge_segments(segments, max_s) == want


def test_speech_segments_are_merged_up_to_the_window() -> None:
    asr = FakeASR()
    table = {"a": (45.0, [(1.0, 2.0), (3.0, 4.0), (40.0, 41.0)]), "b": (70.0, [(0.0, 65.0)])}
    got = run(items_for("a", "b"), asr, table, batch_size=8)
    assert asr.batches == [[48000, 16000, 346667, 346666, 346667]]  # b: 65 s split into three equal parts
    assert [(s.start, s.end) for s in got["a"].segments] == [(1.0, 4.0), (40.0, 41.0)]


def test_timestamps_are_asked_for_where_the_asr_takes_them() -> None:
    class Timed(FakeASR):
        def transcribe_batch(self, audios, language=None, *, timestamps: bool = False):  # type: ignore[override]
            self.asked = timestamps
            return super().transcribe_batch(audios, language)

    table = {"a": (3.0, [(0.5, 2.5)])}
    for wanted in (True, False):
        asr = Timed(split=True)
        run(items_for("a"), asr, table, timestamps=wanted)
        assert asr.asked is wanted
    run(items_for("a"), FakeASR(), table, timestamps=True)  # no keyword, not passed: no TypeError


def test_batcher_flush_runs_a_last_partial_batch() -> None:
    asr = FakeASR()
    b = ClipBatcher(asr, batch_size=8)
    assert b.flush() == []
    assert not b.ready
    assert asr.batches == []
