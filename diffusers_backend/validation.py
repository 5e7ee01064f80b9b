"""One request's input tensors → a checked :class:`GenerationRequest`, or an error naming field, value, rule.

Triton already rejects inputs whose datatype or rank differs from ``config.pbtxt``; the checks here repeat the
datatype and element count anyway, so that the rules hold for any caller of :func:`parse_request` and each
message can say what to send instead. Nothing here imports torch.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from inference_client.contract import MAX_SEED

from .errors import MISSING, InvalidRequestError, ModelConfigError, Shown
from .families import PipelineTraits
from .settings import ModelSettings

MAX_DRAWN_SEED = 2**53 - 1
"""Seeds drawn for unseeded requests stay below this, so they survive JSON and JavaScript numbers exactly."""


@dataclass(frozen=True)
class GenerationRequest:
    """A request whose every field has been checked and defaulted."""

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int

    @property
    def group_key(self) -> tuple[int, int, int, float, bool]:
        """Requests with equal keys can share one pipeline call.

        Whether a negative prompt is present is part of the key: SDXL encodes "no negative prompt" as zeros,
        which differs from any prompt text, so the two cannot be mixed in one call.
        """
        return (self.width, self.height, self.steps, self.guidance_scale, self.negative_prompt is not None)


@dataclass(frozen=True)
class RequestLimits:
    """Defaults and rules for one served model: its pipeline's traits narrowed by its settings."""

    family_name: str
    size_multiple: int
    default_width: int
    default_height: int
    max_width: int
    max_height: int
    default_steps: int
    max_steps: int
    default_guidance_scale: float
    max_guidance_scale: float
    uses_guidance_scale: bool
    takes_negative_prompt: bool
    negative_prompt_needs_guidance: bool
    """SD1.5/SDXL/SD3 use the negative prompt only through classifier-free guidance (guidance > 1)."""
    max_prompt_bytes: int

    @classmethod
    def for_model(cls, traits: PipelineTraits, settings: ModelSettings) -> RequestLimits:
        max_width, max_height = settings.max_width, settings.max_height
        if traits.max_side is not None:
            max_width, max_height = min(max_width, traits.max_side), min(max_height, traits.max_side)
        default_width = settings.default_width or min(traits.native_size, max_width)
        default_height = settings.default_height or min(traits.native_size, max_height)
        default_guidance = traits.default_guidance_scale
        if settings.default_guidance_scale is not None:
            default_guidance = settings.default_guidance_scale
        takes_negative = traits.family.takes_negative_prompt or settings.true_cfg_scale > 1
        limits = cls(
            family_name=traits.family.name,
            size_multiple=traits.size_multiple,
            default_width=default_width,
            default_height=default_height,
            max_width=max_width,
            max_height=max_height,
            default_steps=settings.default_steps or traits.default_steps,
            max_steps=settings.max_steps,
            default_guidance_scale=default_guidance,
            max_guidance_scale=settings.max_guidance_scale,
            uses_guidance_scale=traits.uses_guidance_scale,
            takes_negative_prompt=takes_negative,
            negative_prompt_needs_guidance=traits.family.takes_negative_prompt,
            max_prompt_bytes=settings.max_prompt_bytes,
        )
        limits.check_defaults()
        return limits

    def check_defaults(self) -> None:
        """Defaults must pass the rules requests are held to: else every request that relies on them fails."""
        for key, value, maximum in (("default_width", self.default_width, self.max_width),
                                    ("default_height", self.default_height, self.max_height)):
            if value % self.size_multiple or value > maximum:
                raise ModelConfigError(
                    f"{key}={value} is invalid for this {self.family_name} pipeline: must be a multiple of "
                    f"{self.size_multiple} and at most {maximum} (set {key}, or raise max_width/max_height)"
                )


def draw_seed() -> int:
    return secrets.randbelow(MAX_DRAWN_SEED + 1)


def parse_request(
    tensors: Mapping[str, np.ndarray],
    limits: RequestLimits,
    seed_source: Callable[[], int] = draw_seed,
) -> GenerationRequest:
    """Check one request's tensors (name → array as Triton gives them) and fill in the defaults."""
    guidance_scale = _guidance_scale(tensors, limits)
    prompt, negative_prompt = _prompts(tensors, limits, guidance_scale)
    width = _side(tensors, "WIDTH", limits.default_width, limits.max_width, limits)
    height = _side(tensors, "HEIGHT", limits.default_height, limits.max_height, limits)
    steps = _integer(tensors, "NUM_INFERENCE_STEPS", np.int32, limits.default_steps)
    if not 1 <= steps <= limits.max_steps:
        raise InvalidRequestError(
            "NUM_INFERENCE_STEPS", steps, f"must be between 1 and {limits.max_steps} for this model"
        )
    seed = _optional_integer(tensors, "SEED", np.int64)
    if seed is None:
        seed = seed_source()
    elif not 0 <= seed <= MAX_SEED:
        raise InvalidRequestError("SEED", seed, f"must be between 0 and {MAX_SEED}")
    return GenerationRequest(
        prompt=prompt,
        negative_prompt=negative_prompt,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=guidance_scale,
        seed=seed,
    )


def _prompts(
    tensors: Mapping[str, np.ndarray], limits: RequestLimits, guidance_scale: float
) -> tuple[str, str | None]:
    prompt = _text(tensors, "PROMPT", limits.max_prompt_bytes)
    if prompt is None:
        raise InvalidRequestError("PROMPT", MISSING, "it is required: send one UTF-8 string")
    if not prompt.strip():
        raise InvalidRequestError("PROMPT", prompt, "must contain visible text, not be empty or blank")
    negative_prompt = _text(tensors, "NEGATIVE_PROMPT", limits.max_prompt_bytes)
    if negative_prompt is not None and not negative_prompt.strip():
        return prompt, None  # an empty negative prompt means "none", the same in every family
    if negative_prompt is not None and not limits.takes_negative_prompt:
        raise InvalidRequestError(
            "NEGATIVE_PROMPT", negative_prompt,
            f"this {limits.family_name} model has no classifier-free guidance to use it with; omit it "
            "(an operator can enable it with the config parameter true_cfg_scale > 1, at twice the cost)",
        )
    if negative_prompt is not None and limits.negative_prompt_needs_guidance and guidance_scale <= 1:
        # The pipelines skip classifier-free guidance, and with it the negative prompt, at guidance <= 1.
        raise InvalidRequestError(
            "NEGATIVE_PROMPT", negative_prompt,
            f"has no effect at GUIDANCE_SCALE={guidance_scale:g}; send guidance above 1 with it, or omit it",
        )
    return prompt, negative_prompt


def _side(tensors: Mapping[str, np.ndarray], field: str, default: int, maximum: int, limits: RequestLimits) -> int:
    value = _integer(tensors, field, np.int32, default)
    if value < 1 or value % limits.size_multiple:
        raise InvalidRequestError(
            field, value, f"must be a positive multiple of {limits.size_multiple} for {limits.family_name} models"
        )
    if value > maximum:
        raise InvalidRequestError(field, value, f"must be at most {maximum} pixels for this model")
    return value


def _guidance_scale(tensors: Mapping[str, np.ndarray], limits: RequestLimits) -> float:
    guidance_scale = _number(tensors, "GUIDANCE_SCALE", np.float32, limits.default_guidance_scale)
    if not math.isfinite(guidance_scale):
        # diffusers would silently run without guidance on NaN: refuse instead.
        raise InvalidRequestError("GUIDANCE_SCALE", guidance_scale, "must be a finite number")
    if not 0 <= guidance_scale <= limits.max_guidance_scale:
        raise InvalidRequestError(
            "GUIDANCE_SCALE", guidance_scale, f"must be between 0 and {limits.max_guidance_scale}"
        )
    if not limits.uses_guidance_scale and guidance_scale != limits.default_guidance_scale:
        raise InvalidRequestError(
            "GUIDANCE_SCALE", guidance_scale,
            f"this guidance-distilled {limits.family_name} model ignores guidance; omit it or send "
            f"{limits.default_guidance_scale}",
        )
    return guidance_scale


def _single(tensors: Mapping[str, np.ndarray], field: str) -> np.ndarray | None:
    array = tensors.get(field)
    if array is None:
        return None
    if array.size != 1:
        raise InvalidRequestError(
            field, Shown(f"<{array.size} values, shape {list(array.shape)}>"),
            "must hold exactly one value per request, shape [1, 1] with the batch dimension "
            "(send one request per image; the server batches requests itself)",
        )
    return array


def _text(tensors: Mapping[str, np.ndarray], field: str, max_bytes: int) -> str | None:
    array = _single(tensors, field)
    if array is None:
        return None
    raw = array.reshape(-1)[0]
    if not isinstance(raw, bytes):
        raise InvalidRequestError(field, Shown(f"<{array.dtype} tensor>"), "must be a BYTES tensor holding UTF-8 text")
    if len(raw) > max_bytes:
        raise InvalidRequestError(field, Shown(f"<{len(raw)} bytes>"), f"must be at most {max_bytes} bytes of UTF-8")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidRequestError(
            field, raw, f"must be valid UTF-8 (bad byte at offset {error.start})"
        ) from None
    if "\x00" in text:
        raise InvalidRequestError(field, text, "must not contain NUL characters")
    return text


def _optional_integer(tensors: Mapping[str, np.ndarray], field: str, dtype: type[np.integer]) -> int | None:
    array = _single(tensors, field)
    if array is None:
        return None
    if array.dtype != dtype:
        raise InvalidRequestError(
            field, Shown(f"<{array.dtype} tensor>"), f"must be an {np.dtype(dtype).name.upper()} tensor"
        )
    return int(array.reshape(-1)[0])


def _integer(tensors: Mapping[str, np.ndarray], field: str, dtype: type[np.integer], default: int) -> int:
    value = _optional_integer(tensors, field, dtype)
    return default if value is None else value


def _number(tensors: Mapping[str, np.ndarray], field: str, dtype: type[np.floating], default: float) -> float:
    array = _single(tensors, field)
    if array is None:
        return default
    if array.dtype != dtype:
        raise InvalidRequestError(field, Shown(f"<{array.dtype} tensor>"), "must be an FP32 tensor")
    return float(array.reshape(-1)[0])
