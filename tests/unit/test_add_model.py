"""scripts/add_model: family detection, variants and refusals on the tiny pipelines' folders (no server)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("torch")  # the tiny pipelines are built with it (and then cached)
from huggingface_hub import constants

from diffusers_backend.families import FAMILY_BY_PIPELINE_CLASS
from diffusers_backend.settings import ModelSettings
from diffusers_backend.tiny import build_tiny_models
from tests.hub_cache import put_in_hub_cache
from triton_launcher.add_model import (
    AddModelError,
    AddModelOptions,
    InstanceGroup,
    add_model,
    main,
)
from triton_launcher.paths import MODEL_REPOSITORY, TINY_PIPELINES
from triton_launcher.repository import FAMILY_MODELS, cpu_instance_groups, read_parameters


@pytest.fixture(scope="module")
def tiny_pipelines() -> dict[str, Path]:
    return build_tiny_models(TINY_PIPELINES)


def variant_of(pipeline: Path, folder: Path, scheduler: dict[str, object] | None = None,
               class_name: str | None = None) -> Path:
    """A copy of ``pipeline`` in ``folder`` with scheduler config entries or the pipeline class changed."""
    shutil.copytree(pipeline, folder)
    if scheduler is not None:
        path = folder / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **scheduler}))
    if class_name is not None:
        path = folder / "model_index.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "_class_name": class_name}))
    return folder


def parameters_of(folder: Path) -> dict[str, str]:
    return read_parameters((folder / "config.pbtxt").read_text())


@pytest.mark.parametrize("family", FAMILY_MODELS)
def test_tiny_pipeline_gets_its_familys_config_with_only_name_weights_and_instances_changed(
    family: str, tiny_pipelines: dict[str, Path], tmp_path: Path
) -> None:
    repository = tmp_path / "repository"
    added = add_model(AddModelOptions(str(tiny_pipelines[family]), name=f"added-{family}", repository=repository,
                                      instances=InstanceGroup("cpu", 1)))

    assert added.family.name == family
    model_directory = repository / f"added-{family}"
    assert added.folders == (model_directory,)
    config = (model_directory / "config.pbtxt").read_text()
    real = (MODEL_REPOSITORY / family / "config.pbtxt").read_text()
    assert f'name: "added-{family}"' in config
    assert cpu_instance_groups(1) in config
    assert "KIND_GPU" not in config
    # Tensor contract, batching and queue policy are the family's, verbatim.
    assert real[real.index("max_batch_size"):real.index("instance_group")] in config
    parameters, real_parameters = parameters_of(model_directory), read_parameters(real)
    assert parameters["model_id"] == f"added-{family}"
    assert (model_directory / parameters["model_source"]).resolve() == tiny_pipelines[family].resolve()
    assert parameters["dtype_gpu"] == real_parameters["dtype_gpu"]
    assert parameters["dtype_cpu"] == real_parameters["dtype_cpu"]
    assert "variant" not in parameters  # the family's fp16 variant names files the tiny folder lacks
    assert not {"default_steps", "default_guidance_scale", "revision"} & parameters.keys()
    ModelSettings.from_parameters({key: {"string_value": value} for key, value in parameters.items()})
    family_model_py = MODEL_REPOSITORY / family / "1" / "model.py"
    assert (model_directory / "1" / "model.py").read_bytes() == family_model_py.read_bytes()


def test_streaming_writes_the_decoupled_variant_next_to_the_model(
    tiny_pipelines: dict[str, Path], tmp_path: Path
) -> None:
    added = add_model(AddModelOptions(str(tiny_pipelines["sd15"]), name="watched", repository=tmp_path,
                                      streaming=True))

    assert added.folders == (tmp_path / "watched", tmp_path / "watched-stream")
    stream = (tmp_path / "watched-stream" / "config.pbtxt").read_text()
    assert 'name: "watched-stream"' in stream
    assert "model_transaction_policy { decoupled: true }" in stream
    assert 'name: "STEPS_DONE"' in stream
    assert parameters_of(tmp_path / "watched-stream") == parameters_of(tmp_path / "watched")
    assert "instance_group [ { kind: KIND_GPU count: 1 } ]" in stream  # the family's, as asked


def test_unknown_pipeline_class_is_refused_listing_the_supported_ones(
    tiny_pipelines: dict[str, Path], tmp_path: Path
) -> None:
    folder = variant_of(tiny_pipelines["sd15"], tmp_path / "img2img", class_name="StableDiffusionImg2ImgPipeline")

    with pytest.raises(AddModelError) as caught:
        add_model(AddModelOptions(str(folder), repository=tmp_path / "repository"))
    message = str(caught.value)
    assert "_class_name='StableDiffusionImg2ImgPipeline' is not a supported text-to-image pipeline" in message
    for class_name in FAMILY_BY_PIPELINE_CLASS:
        assert class_name in message
    assert not (tmp_path / "repository").exists()


def test_v_prediction_pipeline_needs_no_extra_parameter_and_says_so(
    tiny_pipelines: dict[str, Path], tmp_path: Path
) -> None:
    folder = variant_of(tiny_pipelines["sd15"], tmp_path / "sd21-v", scheduler={"prediction_type": "v_prediction"})
    added = add_model(AddModelOptions(str(folder), repository=tmp_path / "repository"))

    assert added.name == "sd21-v"
    assert added.family.name == "sd15"
    assert added.prediction_type == "v_prediction"
    assert set(parameters_of(tmp_path / "repository" / "sd21-v")) == {"model_id", "model_source", "dtype_gpu",
                                                                        "dtype_cpu"}
    assert "# v-prediction" in (tmp_path / "repository" / "sd21-v" / "config.pbtxt").read_text()


@pytest.mark.parametrize(("family", "folder_name", "scheduler", "expected"), [
    ("sdxl", "sdxl-turbo", None, ("1", "0")),
    ("sd15", "sd_turbo", None, ("1", "0")),
    ("sd3", "stable-diffusion-3.5-large-turbo", None, ("4", "0")),
    ("sdxl", "fast-xl", {"_class_name": "EulerAncestralDiscreteScheduler", "timestep_spacing": "trailing"},
     ("1", "0")),
    ("sdxl", "turbocharged-xl", None, None),  # "turbo" must be a word of the name
    ("sdxl", "trailing-euler", {"timestep_spacing": "trailing"}, None),  # trailing alone is not turbo
    ("flux", "flux-turbo", None, None),  # FLUX's few-step kind (schnell) is recognised at load time
])
def test_turbo_style_defaults_follow_the_documented_rule(
    family: str, folder_name: str, scheduler: dict[str, object] | None, expected: tuple[str, str] | None, *,
    tiny_pipelines: dict[str, Path], tmp_path: Path
) -> None:
    folder = variant_of(tiny_pipelines[family], tmp_path / folder_name, scheduler=scheduler)
    added = add_model(AddModelOptions(str(folder), repository=tmp_path / "repository"))

    parameters = parameters_of(tmp_path / "repository" / added.name)
    written = (parameters["default_steps"], parameters["default_guidance_scale"]) \
        if "default_steps" in parameters else None
    assert written == expected
    assert (added.turbo_reason is not None) == (expected is not None)


def test_turbo_detection_can_be_overridden_and_explicit_defaults_win(
    tiny_pipelines: dict[str, Path], tmp_path: Path
) -> None:
    folder = variant_of(tiny_pipelines["sdxl"], tmp_path / "sdxl-turbo")
    add_model(AddModelOptions(str(folder), name="plain", repository=tmp_path, turbo=False))
    add_model(AddModelOptions(str(folder), name="two-steps", repository=tmp_path, default_steps=2))
    add_model(AddModelOptions(str(tiny_pipelines["sdxl"]), name="forced", repository=tmp_path, turbo=True,
                              default_guidance_scale=1.5))

    assert "default_steps" not in parameters_of(tmp_path / "plain")
    assert parameters_of(tmp_path / "two-steps")["default_steps"] == "2"
    assert parameters_of(tmp_path / "two-steps")["default_guidance_scale"] == "0"
    assert parameters_of(tmp_path / "forced")["default_steps"] == "1"
    assert parameters_of(tmp_path / "forced")["default_guidance_scale"] == "1.5"


def test_existing_model_folder_is_refused_unless_forced_and_force_keeps_other_files(
    tiny_pipelines: dict[str, Path], tmp_path: Path
) -> None:
    options = AddModelOptions(str(tiny_pipelines["flux"]), name="mine", repository=tmp_path)
    add_model(options)
    (tmp_path / "mine" / "notes.txt").write_text("kept")
    (tmp_path / "mine" / "config.pbtxt").write_text("edited")

    with pytest.raises(AddModelError, match=r"mine exists: pass --force"):
        add_model(options)
    assert (tmp_path / "mine" / "config.pbtxt").read_text() == "edited"
    add_model(AddModelOptions(str(tiny_pipelines["flux"]), name="mine", repository=tmp_path, force=True))
    assert 'name: "mine"' in (tmp_path / "mine" / "config.pbtxt").read_text()
    assert (tmp_path / "mine" / "notes.txt").read_text() == "kept"


def test_streaming_variant_folder_that_exists_is_refused_too(tiny_pipelines: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "mine-stream").mkdir()
    with pytest.raises(AddModelError, match=r"mine-stream exists"):
        add_model(AddModelOptions(str(tiny_pipelines["sd15"]), name="mine", repository=tmp_path, streaming=True))
    assert not (tmp_path / "mine").exists()


@pytest.mark.parametrize("name", ["bad name", "-leading-dash", "a/b", "x" * 101, "ünïcode", ".."])
def test_name_that_triton_cannot_serve_is_refused_with_the_rule(
    name: str, tiny_pipelines: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(AddModelError) as caught:
        add_model(AddModelOptions(str(tiny_pipelines["sd15"]), name=name, repository=tmp_path))
    assert f"model name {name!r} is invalid" in str(caught.value)
    assert "/v2/models/NAME" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_source_that_is_not_a_diffusers_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.safetensors").write_bytes(b"\0")
    cases = {
        str(tmp_path / "empty"): "it holds no model_index.json",
        str(tmp_path / "weights.safetensors"): "it is a file",
        str(tmp_path / "missing"): "no such directory",
    }
    for source, reason in cases.items():
        with pytest.raises(AddModelError) as caught:
            add_model(AddModelOptions(source, repository=tmp_path / "repository"))
        assert str(caught.value).startswith(f"{source} is not a diffusers pipeline folder: {reason}")
    assert not (tmp_path / "repository").exists()


@pytest.fixture
def offline_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read at import; looked up at every call
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_id_reads_only_the_json_files_from_the_cache_and_pins_the_revision(
    offline_hub_cache: Path, tiny_pipelines: dict[str, Path], tmp_path: Path
) -> None:
    json_only = tmp_path / "json-only"
    (json_only / "scheduler").mkdir(parents=True)
    shutil.copy(tiny_pipelines["sdxl"] / "model_index.json", json_only)
    shutil.copy(tiny_pipelines["sdxl"] / "scheduler" / "scheduler_config.json", json_only / "scheduler")
    put_in_hub_cache(offline_hub_cache, "example-org/sdxl-turbo", json_only, revision="v1", commit="a" * 40)

    added = add_model(AddModelOptions("example-org/sdxl-turbo", repository=tmp_path / "repository", revision="v1",
                                      variant="fp16"))

    assert added.name == "sdxl-turbo"
    assert added.family.name == "sdxl"
    assert parameters_of(tmp_path / "repository" / "sdxl-turbo") == {
        "model_id": "example-org/sdxl-turbo", "revision": "v1", "variant": "fp16", "default_steps": "1",
        "default_guidance_scale": "0", "dtype_gpu": "float16", "dtype_cpu": "float32",
    }


def test_hub_id_offline_and_not_cached_fails_clearly(offline_hub_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(AddModelError) as caught:
        add_model(AddModelOptions("example-org/not-cached", repository=tmp_path / "repository"))
    assert str(caught.value).startswith(
        "model_index.json of example-org/not-cached cannot be read: HF_HUB_OFFLINE is set and it is not in the cache"
    )
    assert "`hf download example-org/not-cached`" in str(caught.value)


def test_command_line_reports_a_refusal_on_stderr_with_exit_status_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(tmp_path), "--repository", str(tmp_path / "repository")]) == 1
    assert capsys.readouterr().err == (
        f"add_model: {tmp_path} is not a diffusers pipeline folder: it holds no model_index.json (expected the output "
        "of DiffusionPipeline.save_pretrained, or a hub snapshot)\n"
    )


def test_command_line_writes_the_folders_and_names_them(
    tiny_pipelines: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = variant_of(tiny_pipelines["sdxl"], tmp_path / "sdxl-turbo")
    assert main([str(folder), "--repository", str(tmp_path / "r"), "--instances", "cpu:2", "--streaming"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"wrote {tmp_path / 'r' / 'sdxl-turbo'} (sdxl; turbo-style defaults: its name 'sdxl-turbo' says turbo)",
        f"wrote {tmp_path / 'r' / 'sdxl-turbo-stream'} (sdxl; turbo-style defaults: its name 'sdxl-turbo' says turbo)",
    ]
    assert cpu_instance_groups(2) in (tmp_path / "r" / "sdxl-turbo" / "config.pbtxt").read_text()
