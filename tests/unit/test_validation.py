"""Request tensors → GenerationRequest, and every refusal naming field, value and rule (no torch)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from diffusers_backend.errors import InvalidRequestError, ModelConfigError
from diffusers_backend.families import FLUX, SD15, PipelineTraits
from diffusers_backend.settings import ModelSettings
from diffusers_backend.validation import MAX_DRAWN_SEED, RequestLimits, parse_request
from inference_client.contract import MAX_SEED, TextToImage

SD15_TRAITS = PipelineTraits(SD15, native_size=512, size_multiple=8, max_side=None, uses_guidance_scale=True,
                             default_steps=50, default_guidance_scale=7.5, max_sequence_length=None)
SCHNELL_TRAITS = PipelineTraits(FLUX, native_size=1024, size_multiple=16, max_side=None,
                                uses_guidance_scale=False, default_steps=4, default_guidance_scale=0.0,
                                max_sequence_length=256)
SD15_LIMITS = RequestLimits.for_model(SD15_TRAITS, ModelSettings("sd15", max_width=1024, max_steps=60))
SCHNELL_LIMITS = RequestLimits.for_model(SCHNELL_TRAITS, ModelSettings("flux"))


def tensors(**fields: Any) -> dict[str, np.ndarray]:
    return TextToImage(**fields).arrays()


def test_parse_request_applies_model_defaults_when_only_prompt_is_sent() -> None:
    request = parse_request(tensors(prompt="a cat"), SD15_LIMITS, seed_source=lambda: 1234)
    assert (request.width, request.height, request.steps, request.guidance_scale) == (512, 512, 50, 7.5)
    assert (request.prompt, request.negative_prompt, request.seed) == ("a cat", None, 1234)


def test_parse_request_keeps_every_field_when_all_are_valid() -> None:
    request = parse_request(
        tensors(prompt="a cat", negative_prompt="blurry", width=640, height=384, num_inference_steps=12,
                guidance_scale=3.0, seed=MAX_SEED),
        SD15_LIMITS,
    )
    assert (request.width, request.height, request.steps, request.guidance_scale) == (640, 384, 12, 3.0)
    assert (request.negative_prompt, request.seed) == ("blurry", MAX_SEED)


def test_parse_request_draws_a_json_safe_seed_when_none_is_sent() -> None:
    seeds = {parse_request(tensors(prompt="a cat"), SD15_LIMITS).seed for _ in range(20)}
    assert len(seeds) > 1
    assert all(0 <= seed <= MAX_DRAWN_SEED for seed in seeds)


def test_parse_request_treats_blank_negative_prompt_as_none_when_sent_empty() -> None:
    assert parse_request(tensors(prompt="a cat", negative_prompt=" "), SD15_LIMITS).negative_prompt is None


@pytest.mark.parametrize(
    ("fields", "field", "rule"),
    [
        ({"prompt": ""}, "PROMPT", "must contain visible text"),
        ({"prompt": " \n\t"}, "PROMPT", "must contain visible text"),
        ({"prompt": "x" * 5000}, "PROMPT", "at most 4096 bytes"),
        ({"prompt": "a\x00b"}, "PROMPT", "must not contain NUL"),
        ({"prompt": "a", "negative_prompt": "y" * 4097}, "NEGATIVE_PROMPT", "at most 4096 bytes"),
        ({"prompt": "a", "width": 500}, "WIDTH", "positive multiple of 8 for sd15"),
        ({"prompt": "a", "width": 0}, "WIDTH", "positive multiple of 8"),
        ({"prompt": "a", "height": -64}, "HEIGHT", "positive multiple of 8"),
        ({"prompt": "a", "width": 1032}, "WIDTH", "at most 1024 pixels"),
        ({"prompt": "a", "num_inference_steps": 0}, "NUM_INFERENCE_STEPS", "between 1 and 60"),
        ({"prompt": "a", "num_inference_steps": 61}, "NUM_INFERENCE_STEPS", "between 1 and 60"),
        ({"prompt": "a", "guidance_scale": float("nan")}, "GUIDANCE_SCALE", "must be a finite number"),
        ({"prompt": "a", "guidance_scale": float("inf")}, "GUIDANCE_SCALE", "must be a finite number"),
        ({"prompt": "a", "guidance_scale": -1.0}, "GUIDANCE_SCALE", "between 0 and 30"),
        ({"prompt": "a", "guidance_scale": 31.0}, "GUIDANCE_SCALE", "between 0 and 30"),
        ({"prompt": "a", "seed": -1}, "SEED", f"between 0 and {MAX_SEED}"),
    ],
)
def test_parse_request_names_field_value_and_rule_when_a_field_breaks_a_rule(
    fields: dict[str, Any], field: str, rule: str
) -> None:
    with pytest.raises(InvalidRequestError, match=rule) as caught:
        parse_request(tensors(**fields), SD15_LIMITS)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}=")


def test_parse_request_refuses_when_prompt_is_missing() -> None:
    with pytest.raises(InvalidRequestError, match="PROMPT is missing: it is required"):
        parse_request({}, SD15_LIMITS)


def test_parse_request_reports_the_bad_byte_when_prompt_is_not_utf8() -> None:
    arrays = {"PROMPT": np.array([[b"caf\xe9"]], dtype=np.object_)}
    rule = r"PROMPT=b'caf\\xe9' is invalid: must be valid UTF-8 \(bad byte at offset 3\)"
    with pytest.raises(InvalidRequestError, match=rule):
        parse_request(arrays, SD15_LIMITS)


def test_parse_request_refuses_when_a_tensor_holds_two_values() -> None:
    arrays = tensors(prompt="a")
    arrays["WIDTH"] = np.array([[512], [512]], dtype=np.int32)
    with pytest.raises(InvalidRequestError, match=r"WIDTH=.*2 values.*exactly one value per request"):
        parse_request(arrays, SD15_LIMITS)


@pytest.mark.parametrize(
    ("field", "array", "rule"),
    [
        ("WIDTH", np.array([[512]], dtype=np.int64), "must be an INT32 tensor"),
        ("SEED", np.array([[1]], dtype=np.int32), "must be an INT64 tensor"),
        ("GUIDANCE_SCALE", np.array([[1.0]], dtype=np.float64), "must be an FP32 tensor"),
        ("PROMPT", np.array([[1]], dtype=np.int32), "must be a BYTES tensor"),
    ],
)
def test_parse_request_names_the_type_when_a_tensor_has_the_wrong_datatype(
    field: str, array: np.ndarray, rule: str
) -> None:
    arrays = tensors(prompt="a")
    arrays[field] = array
    with pytest.raises(InvalidRequestError, match=rule):
        parse_request(arrays, SD15_LIMITS)


def test_parse_request_refuses_negative_prompt_when_flux_has_no_true_cfg() -> None:
    with pytest.raises(InvalidRequestError, match=r"NEGATIVE_PROMPT=.*true_cfg_scale > 1"):
        parse_request(tensors(prompt="a", negative_prompt="blurry"), SCHNELL_LIMITS)


def test_parse_request_accepts_negative_prompt_when_flux_enables_true_cfg() -> None:
    limits = RequestLimits.for_model(SCHNELL_TRAITS, ModelSettings("flux", true_cfg_scale=4.0))
    assert parse_request(tensors(prompt="a", negative_prompt="blurry"), limits).negative_prompt == "blurry"


def test_parse_request_refuses_guidance_when_flux_is_guidance_distilled() -> None:
    with pytest.raises(InvalidRequestError, match=r"GUIDANCE_SCALE=3\.5 is invalid: .*ignores guidance"):
        parse_request(tensors(prompt="a", guidance_scale=3.5), SCHNELL_LIMITS)
    assert parse_request(tensors(prompt="a", guidance_scale=0.0), SCHNELL_LIMITS).guidance_scale == 0.0


def test_parse_request_uses_multiple_of_16_when_family_is_flux() -> None:
    with pytest.raises(InvalidRequestError, match="WIDTH=520 is invalid: must be a positive multiple of 16"):
        parse_request(tensors(prompt="a", width=520), SCHNELL_LIMITS)


def test_request_limits_take_operator_overrides_when_settings_set_defaults() -> None:
    turbo = ModelSettings("stabilityai/sdxl-turbo", default_steps=1, default_guidance_scale=0.0)
    limits = RequestLimits.for_model(SD15_TRAITS, turbo)
    assert (limits.default_steps, limits.default_guidance_scale) == (1, 0.0)


def test_request_limits_cap_sizes_by_the_architecture_when_it_is_smaller_than_settings() -> None:
    traits = PipelineTraits(SD15, 256, 16, max_side=1536, uses_guidance_scale=True, default_steps=28,
                            default_guidance_scale=7.0, max_sequence_length=256)
    limits = RequestLimits.for_model(traits, ModelSettings("sd3", max_width=2048, max_height=1024))
    assert (limits.max_width, limits.max_height) == (1536, 1024)


def test_error_message_shortens_the_value_when_it_is_a_long_prompt() -> None:
    error = InvalidRequestError("PROMPT", "secret " * 100, "rule")
    assert len(str(error)) < 120
    assert "(702 chars)" in str(error)


@pytest.mark.parametrize("guidance_scale", [0.0, 1.0])
def test_parse_request_refuses_negative_prompt_when_guidance_is_too_low_to_use_it(guidance_scale: float) -> None:
    with pytest.raises(InvalidRequestError, match=r"NEGATIVE_PROMPT='blurry' is invalid: has no effect at GUIDANCE"):
        parse_request(tensors(prompt="a", negative_prompt="blurry", guidance_scale=guidance_scale), SD15_LIMITS)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (ModelSettings("sd15", default_width=500), r"default_width=500 is invalid for this sd15 pipeline"),
        (ModelSettings("sd15", max_height=500), r"default_height=500 is invalid .* raise max_width/max_height"),
    ],
)
def test_request_limits_refuse_defaults_that_requests_could_not_use_when_model_loads(
    settings: ModelSettings, message: str
) -> None:
    with pytest.raises(ModelConfigError, match=message):
        RequestLimits.for_model(SD15_TRAITS, settings)
