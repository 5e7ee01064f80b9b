"""Tiny diffusers pipelines, built fully offline, with the weights trained here on captioned shapes.

Four families are supported: SD1.5, SDXL, SD3 and FLUX (schnell flavour). Each
pipeline has real component classes and wiring but only a few million parameters,
trained by ``scripts/train-tiny`` to draw the coloured shapes of ``workbench/shapes.py``
(``tiny_weights/``), so tests can load and run it on a CPU in well under a second
and see that the prompt reaches the image.
Nothing is downloaded: tokenizer files are written by hand into a temporary
folder and loaded with ``from_pretrained``, the construction path that behaves
the same on transformers 4.x and 5.x (direct constructor arguments do not).

The configs follow the verified reference in ``shared/docs/tiny-pipelines.md``;
the comments below repeat the constraints that tie their numbers together.

This module holds the cache, the command line and the constants the launcher needs, and imports no torch; the
builders are in :mod:`.tiny_pipelines`.

Usage from the command line::

    python -m diffusers_backend.tiny --out DIR [--family sd15 ...]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import pathlib
import shutil
import sys
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .families import FAMILIES

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

TINY_FAMILIES: tuple[str, ...] = tuple(family.name for family in FAMILIES)

TINY_NATIVE_SIZE = 128
"""Side in pixels of the images the tiny models are trained on, and of what they draw by default."""

TINY_DEFAULT_STEPS = {"sd15": 25, "sdxl": 25}
"""Denoising steps of the tiny UNet models when a request names none (the real ones' default is 50): enough for
their schedulers to draw what they were trained on, at half the cost."""

TINY_DEFAULT_GUIDANCE = {"sd15": 3.0, "sdxl": 2.0, "sd3": 2.0}
"""Classifier-free guidance scale of the tiny models when a request names none (the real ones' 7.5, 5 and 7).

Small models trained briefly overshoot at the real defaults: the colours come out wrong and saturated. Measured
with ``scripts/eval-tiny FAMILY --guidance G`` on the held-out captions (docs/models.md); tiny-flux, like
FLUX.1-schnell, takes no guidance.
"""

TINY_T5_SEQUENCE_LENGTH = 64
"""T5 tokens the tiny SD3 and FLUX models are trained and served with (their ``max_sequence_length``).

The real models' 256 or 512 would be mostly padding for captions of a dozen tokens, and in SD3's and FLUX's
transformers every text token costs as much as an image token: 64 trains and serves them 2 to 2.5 times faster.
"""

# Written inside every cached folder; its presence with a matching fingerprint
# is what marks the folder as a complete build.
STAMP_FILE_NAME = ".tiny-build.json"
# Serialises builders of the same root across processes.
LOCK_FILE_NAME = ".tiny-build.lock"
# Bump when the stamp layout itself changes.
STAMP_FORMAT_VERSION = 1
# Libraries whose version changes what a build writes.
_FINGERPRINTED_DISTRIBUTIONS = ("torch", "diffusers", "transformers", "tokenizers")


_BUILDER_MODULES = ("tiny.py", "tiny_pipelines.py")
_TRAINED_WEIGHTS = pathlib.Path(__file__).parent / "tiny_weights"


def check_family(family: str) -> None:
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny pipeline family {family!r}; expected one of {TINY_FAMILIES}")


def build_tiny_pipeline(family: str) -> DiffusionPipeline:
    """Build the tiny pipeline of ``family`` (one of TINY_FAMILIES), with its trained weights when there are any.

    Deterministic: two builds hold identical tensors. Every module is fp32 and in eval mode.
    """
    from .tiny_pipelines import build_tiny_pipeline as build

    return build(family)


def save_tiny_pipeline(family: str, folder: pathlib.Path) -> None:
    """Build ``family`` and save it to ``folder`` as safetensors.

    The written files are byte-for-byte identical across builds and processes.
    """
    from huggingface_hub.utils import disable_progress_bars  # type: ignore[attr-defined]

    disable_progress_bars()  # one bar per shard of a megabyte is noise in every log
    build_tiny_pipeline(family).save_pretrained(folder, safe_serialization=True)


# --- Cached, concurrent-safe building ----------------------------------------


def builder_fingerprint() -> str:
    """Identify what a build would write: this module's code plus library versions."""
    digest = hashlib.sha256()
    here = pathlib.Path(__file__).parent
    for module in _BUILDER_MODULES:
        digest.update(here.joinpath(module).read_bytes())
    # The trained weights are part of what a build writes: retraining rebuilds the cached pipelines.
    for weights in sorted(_TRAINED_WEIGHTS.glob("*.safetensors")):
        digest.update(f"\n{weights.name}\n".encode())
        digest.update(weights.read_bytes())
    for distribution in _FINGERPRINTED_DISTRIBUTIONS:
        digest.update(f"\n{distribution}=={importlib.metadata.version(distribution)}".encode())
    return digest.hexdigest()


def _list_files(folder: pathlib.Path) -> list[str]:
    return sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and path.name != STAMP_FILE_NAME
    )


def _stamp_for(folder: pathlib.Path, family: str, fingerprint: str) -> dict[str, Any]:
    # No timestamps or host details: the stamp is as reproducible as the build.
    return {
        "format": STAMP_FORMAT_VERSION,
        "family": family,
        "fingerprint": fingerprint,
        "files": {name: (folder / name).stat().st_size for name in _list_files(folder)},
    }


def _is_complete_build(folder: pathlib.Path, family: str, fingerprint: str) -> bool:
    """Whether ``folder`` holds an intact build of ``family`` by this builder version."""
    try:
        stamp = json.loads((folder / STAMP_FILE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(stamp, dict):
        return False
    if (
        stamp.get("format") != STAMP_FORMAT_VERSION
        or stamp.get("family") != family
        or stamp.get("fingerprint") != fingerprint
    ):
        return False
    recorded_sizes = stamp.get("files")
    if not isinstance(recorded_sizes, dict) or not recorded_sizes:
        return False
    # Cheap guard against files deleted or truncated after the build.
    for name, size in recorded_sizes.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


@contextlib.contextmanager
def _exclusive_lock(lock_path: pathlib.Path) -> Iterator[None]:
    with open(lock_path, "a+b") as lock_file:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


def _build_into(root: pathlib.Path, family: str, fingerprint: str) -> pathlib.Path:
    """Build ``family`` next to its final folder, then move it into place."""
    target = root / f"tiny-{family}"
    staging = root / f".tiny-{family}.building-{uuid.uuid4().hex}"
    try:
        save_tiny_pipeline(family, staging)
        stamp = _stamp_for(staging, family, fingerprint)
        (staging / STAMP_FILE_NAME).write_text(
            json.dumps(stamp, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        if target.exists():
            # rename() cannot replace a non-empty folder: move the stale one
            # aside first so the target is missing only for an instant.
            discarded = root / f".tiny-{family}.stale-{uuid.uuid4().hex}"
            target.rename(discarded)
            staging.rename(target)
            shutil.rmtree(discarded, ignore_errors=True)
        else:
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _remove_leftovers(root: pathlib.Path, family: str) -> None:
    """Delete staging folders left by crashed builds.

    Only called under the lock, so no live builder can own them.
    """
    for pattern in (f".tiny-{family}.building-*", f".tiny-{family}.stale-*"):
        for leftover in root.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def build_tiny_models(root: pathlib.Path, families: Iterable[str] = TINY_FAMILIES) -> dict[str, pathlib.Path]:
    """Make sure ``root/tiny-<family>`` holds a saved tiny pipeline for each family.

    A folder already holding a complete build by the same builder version
    (same fingerprint) is reused; anything else is rebuilt and swapped in
    atomically. Concurrent callers on the same root are serialised with an
    exclusive lock. Returns family -> folder, in the order requested.
    """
    root = pathlib.Path(root)
    # A bare string is one family, not a sequence of one-letter families.
    requested = [families] if isinstance(families, str) else list(families)
    for family in requested:
        check_family(family)
    wanted = list(dict.fromkeys(requested))  # de-duplicate, keep order

    root.mkdir(parents=True, exist_ok=True)
    fingerprint = builder_fingerprint()
    folders: dict[str, pathlib.Path] = {}
    with _exclusive_lock(root / LOCK_FILE_NAME):
        for family in wanted:
            target = root / f"tiny-{family}"
            if _is_complete_build(target, family, fingerprint):
                folders[family] = target
                continue
            _remove_leftovers(root, family)
            folders[family] = _build_into(root, family, fingerprint)
    return folders


# --- Command line -------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffusers_backend.tiny",
        description="Build (or reuse cached) the tiny diffusers pipelines.",
    )
    parser.add_argument(
        "--out", required=True, type=pathlib.Path, help="folder to hold tiny-<family>/ folders"
    )
    parser.add_argument(
        "--family",
        action="append",
        choices=TINY_FAMILIES,
        help="family to build; repeat for several (default: all)",
    )
    arguments = parser.parse_args(argv)
    families = arguments.family or TINY_FAMILIES
    for family, folder in build_tiny_models(arguments.out, families).items():
        print(f"{family}\t{folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
