"""A Hugging Face hub cache written by hand, for tests that must not (and here cannot) reach the hub."""

from __future__ import annotations

import shutil
from pathlib import Path


def put_in_hub_cache(cache: Path, repo_id: str, pipeline: Path, revision: str, commit: str) -> Path:
    """Store ``pipeline``'s files as commit ``commit`` of hub model ``repo_id``, reachable as ``revision``,
    in huggingface_hub's cache layout (``models--org--name/{refs,snapshots}``); return the snapshot folder.

    huggingface_hub keeps file contents in ``blobs/`` and links them from the snapshot; plain copies in the
    snapshot read the same and are what it falls back to where links are not allowed.
    """
    repository = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repository / "snapshots" / commit
    shutil.copytree(pipeline, snapshot, dirs_exist_ok=True)
    (repository / "refs").mkdir(parents=True, exist_ok=True)
    (repository / "refs" / revision).write_text(commit)
    return snapshot
