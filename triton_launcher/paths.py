"""Where the launcher's things live by default: each location is defined here once.

The state dir and the files a client reads there (the key, ``server.json``) are in :mod:`inference_client.state`.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MODEL_REPOSITORY = PROJECT_ROOT / "model_repository"
"""The real models (SD1.5, SDXL, SD3, FLUX), configured for GPUs."""

CACHE_DIR = Path(os.environ.get("TRITON_DIFFUSERS_CACHE", PROJECT_ROOT / ".cache"))
"""Built artefacts that can always be rebuilt (the tiny models)."""
TINY_PIPELINES = CACHE_DIR / "tiny" / "pipelines"
TINY_REPOSITORY = CACHE_DIR / "tiny" / "model_repository"

LOG_FILE = "tritonserver.log"
STATE_LOCK_FILE = "lock"
"""Held (flock) by the launcher while its server runs: one server per state dir."""
