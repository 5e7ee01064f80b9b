"""Deriving the tiny repository's configs from the real ones (no torch)."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffusers_backend.tiny import TINY_DEFAULT_GUIDANCE
from triton_launcher.paths import MODEL_REPOSITORY
from triton_launcher.repository import (
    FAMILY_MODELS,
    TINY_CPU_INSTANCES,
    cpu_instance_groups,
    read_parameters,
    tiny_config,
    with_parameters,
)


@pytest.mark.parametrize("model", FAMILY_MODELS)
def test_tiny_config_changes_only_name_kind_weights_and_trained_defaults_when_derived(
    model: str, tmp_path: Path
) -> None:
    real = (MODEL_REPOSITORY / model / "config.pbtxt").read_text()
    model_directory = tmp_path / "model_repository" / f"tiny-{model}"
    tiny = tiny_config(real, model, tmp_path / "pipelines" / f"tiny-{model}", model_directory)

    assert f'name: "tiny-{model}"' in tiny
    assert "KIND_GPU" not in tiny
    assert cpu_instance_groups(TINY_CPU_INSTANCES) in tiny
    real_parameters, tiny_parameters = read_parameters(real), read_parameters(tiny)
    assert tiny_parameters["model_id"] == f"tiny-{model}"
    assert tiny_parameters["model_source"] == f"../../pipelines/tiny-{model}"
    assert "variant" not in tiny_parameters
    # What the tiny models were trained for: 128 pixels, fewer steps for the UNets, 64 T5 tokens.
    assert (tiny_parameters["default_width"], tiny_parameters["default_height"]) == ("128", "128")
    assert tiny_parameters.get("default_steps") == {"sd15": "25", "sdxl": "25"}.get(model)
    assert tiny_parameters.get("max_sequence_length") == {"sd3": "64", "flux": "64"}.get(model)
    # A lower guidance than the real models' for the three that take it (tiny-flux, like schnell, takes none).
    assert tiny_parameters.get("default_guidance_scale") == (
        None if model == "flux" else str(TINY_DEFAULT_GUIDANCE[model]))
    unchanged = {key: value for key, value in real_parameters.items() if key not in {"model_id", "variant"}}
    assert unchanged.items() <= tiny_parameters.items()
    # The tensor contract and batching are the real model's.
    body = real[real.index("max_batch_size"):real.index("instance_group")]
    assert body in tiny


def test_with_parameters_keeps_list_commas_valid_when_the_last_entry_is_removed() -> None:
    config = ('parameters [\n  { key: "a" value: { string_value: "1" } },\n'
              '  { key: "b" value: { string_value: "2" } }\n]\n')
    assert with_parameters(config, {"b": None}) == 'parameters [\n  { key: "a" value: { string_value: "1" } }\n]\n'
    added = with_parameters(config, {"c": "3"})
    assert read_parameters(added) == {"a": "1", "b": "2", "c": "3"}
    assert added.count("},") == 2
    assert added.rstrip().endswith('"3" } }\n]')


def test_cpu_instance_groups_prefers_the_first_instance_when_several_are_asked_for() -> None:
    assert cpu_instance_groups(1) == "instance_group [ { kind: KIND_CPU count: 1 rate_limiter { priority: 1 } } ]"
    groups = cpu_instance_groups(3)
    assert groups.count("count: 1") == 3
    assert groups.index("priority: 1 ") < groups.index("priority: 1000")
    assert groups.count("priority: 1000") == 2
