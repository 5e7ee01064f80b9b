"""The typed view of a model's ``config.pbtxt`` ``parameters``, parsed in this one place.

Triton hands parameters to the model as ``{"key": {"string_value": "..."}}``. Every key is declared here with
its type, default and rule; an unknown key (a typo) or a value out of range stops the model from loading with a
message naming the key, the value and the rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from inference_client.contract import DEFAULT_MAX_PROMPT_BYTES

from .errors import ModelConfigError

TORCH_DTYPE_NAMES = ("float32", "float16", "bfloat16")
TORCH_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""``torch.compile``'s modes (https://docs.pytorch.org/docs/stable/generated/torch.compile.html)."""
MAX_T5_SEQUENCE_LENGTH = 512
"""diffusers' SD3 and FLUX pipelines refuse a longer max_sequence_length (their check_inputs)."""


@dataclass(frozen=True)
class ModelSettings:
    """One served model's deployment settings. Defaults left as None come from the pipeline itself."""

    model_id: str
    """The id clients and capabilities name the model by, e.g. ``stabilityai/stable-diffusion-xl-base-1.0``."""
    model_source: str = ""
    """Hub repository id or local folder to load from (relative paths are relative to the model's
    directory in the repository). Empty: the hub repository ``model_id``."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin the weights to."""
    variant: str | None = None
    """Weight variant to fetch from the hub, e.g. ``fp16`` (half the download)."""
    dtype_gpu: str = "float16"
    dtype_cpu: str = "float32"
    default_width: int | None = None
    default_height: int | None = None
    default_steps: int | None = None
    default_guidance_scale: float | None = None
    max_width: int = 2048
    max_height: int = 2048
    max_steps: int = 100
    max_guidance_scale: float = 30.0
    max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES
    max_sequence_length: int | None = None
    """T5 tokens for SD3/FLUX; None: the family's default."""
    true_cfg_scale: float = 1.0
    """FLUX only: > 1 enables true classifier-free guidance, and with it NEGATIVE_PROMPT (two passes a step)."""
    cpu_threads: int | None = None
    """torch intra-op threads of a CPU instance generating alone; None: every core the process may use."""
    channels_last: bool = False
    """Store the UNet's and the VAE's activations channels-last (NHWC), which convolution kernels on recent
    GPUs prefer; transformer families keep their layout."""
    attention_backend: str | None = None
    """diffusers attention backend of the denoiser (``set_attention_backend``), e.g. ``native``, ``flash``,
    ``_native_cudnn``; None: diffusers' default (PyTorch SDPA)."""
    torch_compile: str | None = None
    """``torch.compile`` the denoiser with this mode (one of :data:`TORCH_COMPILE_MODES`); None: eager. The
    load's warm-up then compiles, so start-up takes longer and the first request does not."""
    share_cpu_cores: bool = True
    """With several CPU instances: each takes ``cpu_threads // busy instances`` threads, re-counted at every
    denoising step (see cpu_sharing.py). False: each always uses ``cpu_threads``."""

    @property
    def source(self) -> str:
        return self.model_source or self.model_id

    def torch_dtype_name(self, on_gpu: bool) -> str:
        return self.dtype_gpu if on_gpu else self.dtype_cpu

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, Any]) -> ModelSettings:
        """Parse Triton's ``model_config["parameters"]``; raise :class:`ModelConfigError` on any bad entry."""
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(parameters) - known)
        if unknown:
            raise ModelConfigError(
                f"config.pbtxt parameters {unknown} are unknown; the known ones are {sorted(known)}"
            )
        values: dict[str, Any] = {}
        for key, raw in parameters.items():
            text = raw.get("string_value", "") if isinstance(raw, Mapping) else str(raw)
            values[key] = _PARSERS[key](key, text.strip())
        if not values.get("model_id"):
            raise ModelConfigError("config.pbtxt parameter model_id is missing or empty: every model needs one")
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        for key in ("dtype_gpu", "dtype_cpu"):
            value = getattr(self, key)
            if value not in TORCH_DTYPE_NAMES:
                raise ModelConfigError(f"parameter {key}={value!r} is invalid: must be one of {TORCH_DTYPE_NAMES}")
        for key in ("default_width", "default_height", "default_steps", "max_width", "max_height",
                    "max_steps", "max_prompt_bytes", "max_sequence_length", "cpu_threads"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ModelConfigError(f"parameter {key}={value} is invalid: must be a positive integer")
        for key in ("default_guidance_scale", "max_guidance_scale"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ModelConfigError(f"parameter {key}={value} is invalid: must be a finite number >= 0")
        if self.max_sequence_length is not None and self.max_sequence_length > MAX_T5_SEQUENCE_LENGTH:
            raise ModelConfigError(
                f"parameter max_sequence_length={self.max_sequence_length} is invalid: the SD3 and FLUX "
                f"pipelines take at most {MAX_T5_SEQUENCE_LENGTH} T5 tokens"
            )
        if not (math.isfinite(self.true_cfg_scale) and self.true_cfg_scale >= 1):
            raise ModelConfigError(
                f"parameter true_cfg_scale={self.true_cfg_scale} is invalid: must be a finite number >= 1"
            )
        for default_key, max_key in (("default_width", "max_width"), ("default_height", "max_height"),
                                     ("default_steps", "max_steps"),
                                     ("default_guidance_scale", "max_guidance_scale")):
            default, maximum = getattr(self, default_key), getattr(self, max_key)
            if default is not None and default > maximum:
                raise ModelConfigError(
                    f"parameter {default_key}={default} is invalid: must not exceed {max_key}={maximum}"
                )


def _text(_key: str, text: str) -> str:
    return text


def _optional_text(_key: str, text: str) -> str | None:
    return text or None


def _integer(key: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ModelConfigError(f"parameter {key}={text!r} is invalid: must be an integer") from None


def _optional_integer(key: str, text: str) -> int | None:
    return _integer(key, text) if text else None


def _compile_mode(key: str, text: str) -> str | None:
    if not text:
        return None
    if text not in TORCH_COMPILE_MODES:
        raise ModelConfigError(f"parameter {key}={text!r} is invalid: must be one of {list(TORCH_COMPILE_MODES)}")
    return text


def _boolean(key: str, text: str) -> bool:
    lowered = text.lower()
    if lowered not in ("true", "false"):
        raise ModelConfigError(f"parameter {key}={text!r} is invalid: must be true or false")
    return lowered == "true"


def _number(key: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ModelConfigError(f"parameter {key}={text!r} is invalid: must be a number") from None


def _optional_number(key: str, text: str) -> float | None:
    return _number(key, text) if text else None


_PARSERS: dict[str, Callable[[str, str], Any]] = {
    "model_id": _text,
    "model_source": _text,
    "revision": _optional_text,
    "variant": _optional_text,
    "dtype_gpu": _text,
    "dtype_cpu": _text,
    "default_width": _optional_integer,
    "default_height": _optional_integer,
    "default_steps": _optional_integer,
    "default_guidance_scale": _optional_number,
    "max_width": _integer,
    "max_height": _integer,
    "max_steps": _integer,
    "max_guidance_scale": _number,
    "max_prompt_bytes": _integer,
    "max_sequence_length": _optional_integer,
    "true_cfg_scale": _number,
    "cpu_threads": _optional_integer,
    "share_cpu_cores": _boolean,
    "channels_last": _boolean,
    "attention_backend": _optional_text,
    "torch_compile": _compile_mode,
}
