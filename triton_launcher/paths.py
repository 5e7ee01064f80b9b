"""Where things live by default: each location is defined here once."""

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

STATE_DIR = Path(os.environ.get("TRITON_DIFFUSERS_STATE", PROJECT_ROOT / ".state"))
"""Per-server runtime state: the inference key, the server description, the log."""

INFER_KEY_FILE = "infer-key"
"""File in the state dir holding the inference API key (mode 0600)."""
SERVER_FILE = "server.json"
"""File in the state dir describing the running server: its URLs, pid and models (never the key)."""
LOG_FILE = "tritonserver.log"
STATE_LOCK_FILE = "lock"
"""Held (flock) by the launcher while its server runs: one server per state dir."""

INFER_KEY_HEADER = "infer-key"
"""HTTP header (and gRPC metadata key) that carries the inference key: Triton's restricted-API setting."""
