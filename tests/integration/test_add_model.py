"""scripts/add_model round trip through the real tritonserver: every family, the variants, a hub id pinned to a
revision, and a streaming variant, all written by add_model into a fresh repository and served by one server."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import constants
from tritonclient.utils import InferenceServerException

from diffusers_backend.tiny import build_tiny_models
from tests.hub_cache import put_in_hub_cache
from tests.integration.conftest import FAMILIES, Generator, tiny_server_options
from triton_launcher.add_model import AddModelOptions, InstanceGroup, add_model
from triton_launcher.paths import TINY_PIPELINES
from triton_launcher.server import TritonServer

ONE_CPU_INSTANCE = InstanceGroup("cpu", 1)


@pytest.fixture(scope="module")
def added_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Generator]:
    root = tmp_path_factory.mktemp("add-model")
    repository = root / "repository"
    pipelines = build_tiny_models(TINY_PIPELINES)

    def add(source: Path | str, **options: Any) -> None:
        add_model(AddModelOptions(str(source), repository=repository, instances=ONE_CPU_INSTANCE, **options))

    for family in FAMILIES:
        add(pipelines[family], name=f"added-{family}", streaming=family == "sd15")
    v_prediction = shutil.copytree(pipelines["sd15"], root / "sd21-v")
    scheduler_config = v_prediction / "scheduler" / "scheduler_config.json"
    scheduler_config.write_text(json.dumps({**json.loads(scheduler_config.read_text()),
                                            "prediction_type": "v_prediction"}))
    add(v_prediction)
    add(shutil.copytree(pipelines["sdxl"], root / "sdxl-turbo"))

    # A hub id pinned to revision v1, served from the cache only: main holds a pipeline that would not load.
    hf_home = root / "hf-home"
    cache = hf_home / "hub"
    put_in_hub_cache(cache, "example-org/tiny-flux", pipelines["flux"], revision="v1", commit="1" * 40)
    not_a_pipeline = root / "not-a-pipeline"
    not_a_pipeline.mkdir()
    (not_a_pipeline / "model_index.json").write_text(json.dumps({"_class_name": "NotAPipeline"}))
    put_in_hub_cache(cache, "example-org/tiny-flux", not_a_pipeline, revision="main", commit="2" * 40)
    with pytest.MonkeyPatch.context() as environment:
        environment.setenv("HF_HOME", str(hf_home))  # for tritonserver's stubs
        environment.setenv("HF_HUB_OFFLINE", "1")
        environment.setattr(constants, "HF_HUB_CACHE", str(cache))  # for add_model in this process
        add("example-org/tiny-flux", name="hub-flux", revision="v1")
        with TritonServer(tiny_server_options(repository, root / "state")) as server:
            generator = Generator(server)
            yield generator
            generator.client.close()


@pytest.mark.parametrize("model", [*(f"added-{family}" for family in FAMILIES), "sd21-v", "hub-flux"])
def test_added_model_generates_an_image_of_the_requested_size(added_server: Generator, model: str) -> None:
    generated = added_server.generate(model, width=64, height=48, seed=7)
    assert generated.image.shape == (48, 64, 3)
    assert generated.seed == 7


def test_added_v_prediction_model_serves_at_its_native_size_by_default(added_server: Generator) -> None:
    generated = added_server.generate("sd21-v", width=None, height=None)
    assert generated.image.shape == (128, 128, 3)  # the tiny UNet's sample_size 16 times the VAE's 8


def test_added_turbo_model_defaults_to_one_step_without_guidance(added_server: Generator) -> None:
    by_default = added_server.generate("sdxl-turbo", width=64, height=64, seed=3, num_inference_steps=None)
    one_step = added_server.generate("sdxl-turbo", width=64, height=64, seed=3, num_inference_steps=1,
                                     guidance_scale=0.0)
    two_steps = added_server.generate("sdxl-turbo", width=64, height=64, seed=3, num_inference_steps=2,
                                      guidance_scale=0.0)
    assert (by_default.image == one_step.image).all()
    assert not (by_default.image == two_steps.image).all()
    # Guidance 0 by default: a negative prompt, which needs classifier-free guidance, is refused.
    with pytest.raises(InferenceServerException, match="NEGATIVE_PROMPT"):
        added_server.generate("sdxl-turbo", negative_prompt="blurry", num_inference_steps=None)


def test_added_streaming_variant_was_loaded_next_to_its_model(added_server: Generator) -> None:
    ready = {entry["name"] for entry in added_server.client.get_model_repository_index(
        headers=added_server.server.headers) if entry.get("state") == "READY"}
    assert {"added-sd15", "added-sd15-stream", "hub-flux", "sdxl-turbo"} <= ready
