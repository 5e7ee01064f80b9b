"""config.pbtxt parameters → ModelSettings (no torch)."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffusers_backend.errors import ModelConfigError
from diffusers_backend.settings import ModelSettings
from triton_launcher.paths import MODEL_REPOSITORY
from triton_launcher.repository import FAMILY_MODELS, read_parameters


def parameters(**values: str) -> dict[str, dict[str, str]]:
    return {key: {"string_value": value} for key, value in values.items()}


def test_from_parameters_fills_defaults_when_only_model_id_is_given() -> None:
    settings = ModelSettings.from_parameters(parameters(model_id="org/model"))
    assert settings.source == "org/model"
    assert (settings.dtype_gpu, settings.dtype_cpu, settings.default_steps) == ("float16", "float32", None)


def test_from_parameters_parses_numbers_when_overrides_are_set() -> None:
    settings = ModelSettings.from_parameters(parameters(
        model_id="stabilityai/sdxl-turbo", default_steps="1", default_guidance_scale="0", max_width="768",
        model_source="./weights",
    ))
    assert (settings.default_steps, settings.default_guidance_scale, settings.max_width) == (1, 0.0, 768)
    assert settings.source == "./weights"


@pytest.mark.parametrize(("text", "expected"), [("true", True), ("False", False), (" TRUE ", True)])
def test_from_parameters_reads_share_cpu_cores_when_given_a_boolean(text: str, expected: bool) -> None:
    assert ModelSettings.from_parameters(parameters(model_id="m", share_cpu_cores=text)).share_cpu_cores is expected


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({}, "model_id is missing"),
        ({"model_id": "m", "modle_source": "x"}, r"\['modle_source'\] are unknown"),
        ({"model_id": "m", "max_steps": "many"}, "max_steps='many' is invalid: must be an integer"),
        ({"model_id": "m", "max_steps": "0"}, "max_steps=0 is invalid: must be a positive integer"),
        ({"model_id": "m", "dtype_gpu": "fp8"}, "dtype_gpu='fp8' is invalid: must be one of"),
        ({"model_id": "m", "max_guidance_scale": "nan"}, "max_guidance_scale=nan is invalid: must be a finite"),
        ({"model_id": "m", "true_cfg_scale": "0.5"}, "true_cfg_scale=0.5 is invalid: must be a finite number >= 1"),
        ({"model_id": "m", "default_width": "4096"}, "default_width=4096 is invalid: must not exceed max_width"),
        ({"model_id": "m", "max_sequence_length": "1024"}, "max_sequence_length=1024 is invalid: .* at most 512"),
        ({"model_id": "m", "cpu_threads": "0"}, "cpu_threads=0 is invalid: must be a positive integer"),
        ({"model_id": "m", "share_cpu_cores": "yes"}, "share_cpu_cores='yes' is invalid: must be true or false"),
        ({"model_id": "m", "torch_compile": "fast"}, "torch_compile='fast' is invalid: must be one of"),
        ({"model_id": "m", "channels_last": "1"}, "channels_last='1' is invalid: must be true or false"),
    ],
)
def test_from_parameters_names_key_value_and_rule_when_a_parameter_is_bad(
    values: dict[str, str], message: str
) -> None:
    with pytest.raises(ModelConfigError, match=message):
        ModelSettings.from_parameters(parameters(**values))


@pytest.mark.parametrize("model", FAMILY_MODELS)
def test_repository_configs_parse_when_read_as_triton_passes_them(model: str) -> None:
    config = (MODEL_REPOSITORY / model / "config.pbtxt").read_text()
    settings = ModelSettings.from_parameters(parameters(**read_parameters(config)))
    assert "/" in settings.model_id  # a hub id: org/name


def test_repository_serves_the_documented_real_models_when_deployed() -> None:
    ids = {model: read_parameters((MODEL_REPOSITORY / model / "config.pbtxt").read_text())["model_id"]
           for model in FAMILY_MODELS}
    assert ids == {
        "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
        "sd3": "stabilityai/stable-diffusion-3-medium-diffusers",
        "flux": "black-forest-labs/FLUX.1-schnell",
    }


def test_repository_model_files_are_identical_when_compared_across_families() -> None:
    sources = {(MODEL_REPOSITORY / model / "1" / "model.py").read_bytes() for model in FAMILY_MODELS}
    assert len(sources) == 1
    assert not any(path.name.startswith("_") for path in Path(MODEL_REPOSITORY).iterdir())
