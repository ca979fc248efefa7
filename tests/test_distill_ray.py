"""The Ray Data runner: row (de)serialisation and the ASR actor on their own, then a real local Ray
(``num_cpus=2``) running the CLI's ``--ray`` mode with the embedded Whisper base."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from core.distill import cli
from core.distill.manifest import ManifestItem
from core.distill.pipeline import Clip, DecodedFile, DistillOptions, FileResult
from core.distill.ray_runner import ASRActor, decoded_to_row, row_to_decoded
from core.distill.writer import iter_rows
from tests.test_distill import FakeASR
from tests.test_distill_cli import make_media
from tests.test_distill_whisper import WHISPER_DIR

HAS_RAY = importlib.util.find_spec("ray") is not None


def decoded(item_id: str, *lengths: int) -> DecodedFile:
    clips = tuple(
        Clip(float(i), float(i) + n / 16_000, np.full(n, 0.1 * (i + 1), np.float32))
        for i, n in enumerate(lengths)
    )
    return DecodedFile(ManifestItem(item_id, f"/{item_id}.wav"), 9.5, clips)


def test_decoded_rows_survive_the_trip_between_stages() -> None:
    for original in [
        decoded("a", 16_000, 800, 4000),
        decoded("b"),
        DecodedFile(ManifestItem("c", "", "bad row"), error="x"),
    ]:
        row = decoded_to_row(original)
        assert (
            set(row) == {"meta", "audio"} and isinstance(row["meta"], str) and isinstance(row["audio"], bytes)
        )
        back = row_to_decoded(row["meta"], row["audio"])
        assert (back.item, back.duration_s, back.error) == (
            original.item,
            original.duration_s,
            original.error,
        )
        assert [(c.start, c.end) for c in back.clips] == [(c.start, c.end) for c in original.clips]
        assert all(np.array_equal(x.audio, y.audio) for x, y in zip(back.clips, original.clips, strict=True))


def test_the_asr_actor_batches_clips_across_the_files_it_is_given() -> None:
    asr = FakeASR()
    actor = ASRActor(lambda: asr, DistillOptions(batch_size=4))
    rows = [
        decoded_to_row(d) for d in (decoded("a", 1600, 3200, 4800), decoded("b", 6400, 8000), decoded("c"))
    ]
    out = actor(
        {
            "meta": np.array([r["meta"] for r in rows], dtype=object),
            "audio": np.array([r["audio"] for r in rows], dtype=object),
        }
    )
    results = {r.id: r for r in (FileResult.from_row(json.loads(x)) for x in out["row"])}
    assert asr.batches == [[1600, 3200, 4800, 6400], [8000]]
    assert results["a"].text == "n1600 n3200 n4800"
    assert [(s.start, s.end) for s in results["b"].segments] == [(0.0, 0.4), (1.0, 1.5)]
    assert results["c"].status == "no_speech"


@pytest.mark.slow
@pytest.mark.skipif(not HAS_RAY, reason="ray is an optional extra: pip install -r requirements/ray.txt")
@pytest.mark.skipif(
    not (WHISPER_DIR / "model.safetensors").is_file(), reason="the embedded Whisper is not built"
)
def test_ray_runner_with_the_embedded_whisper(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import ray

    media = make_media(tmp_path / "media")
    manifest = tmp_path / "m.jsonl"
    keep = ["wav", "silent", "corrupt", "missing"]
    manifest.write_text("".join(f'{{"id": "{k}", "path": "{media[k]}"}}\n' for k in keep))
    out = tmp_path / "out.jsonl"
    argv = [str(manifest), "--output", str(out), "--ray", "--no-progress"]
    try:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}},
        )
        assert cli.main([*argv, "--asr-factory", "tests.test_distill_whisper:make_whisper"]) == 0
    finally:
        ray.shutdown()
    rows = {r["id"]: r for r in iter_rows(out)}
    assert {k: r["status"] for k, r in rows.items()} == {
        "wav": "ok", "silent": "no_speech", "corrupt": "error", "missing": "error",
    }  # fmt: skip
    assert all(w in rows["wav"]["text"].lower() for w in ("quick", "brown", "fox", "lazy", "dog")), rows[
        "wav"
    ]
    assert rows["missing"]["error"].startswith("missing:")
    assert "ok 1, no_speech 1, error 2" in capsys.readouterr().out
