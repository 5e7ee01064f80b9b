"""Family detection and per-family defaults, from pipeline folders' JSON alone (no torch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from diffusers_backend.errors import ModelLoadError
from diffusers_backend.families import FLUX, SD3, SD15, SDXL, detect_family, inspect_pipeline


def write_pipeline_folder(
    folder: Path, class_name: str, denoiser: str = "unet", denoiser_config: dict[str, Any] | None = None,
    vae_blocks: int = 4,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    for component, config in (("vae", {"block_out_channels": [8] * vae_blocks}),
                              (denoiser, denoiser_config or {"sample_size": 64})):
        (folder / component).mkdir(exist_ok=True)
        (folder / component / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("class_name", "family"),
    [("StableDiffusionPipeline", SD15), ("StableDiffusionXLPipeline", SDXL),
     ("StableDiffusion3Pipeline", SD3), ("FluxPipeline", FLUX)],
)
def test_detect_family_reads_class_name_when_folder_is_a_pipeline(tmp_path: Path, class_name: str, family: Any) -> None:
    assert detect_family(write_pipeline_folder(tmp_path, class_name)) is family


def test_detect_family_ignores_the_name_when_it_suggests_another_family(tmp_path: Path) -> None:
    folder = write_pipeline_folder(tmp_path / "stable-diffusion-xl-flux-sd3", "StableDiffusionPipeline")
    assert detect_family(folder) is SD15


def test_detect_family_names_the_class_when_it_is_unsupported(tmp_path: Path) -> None:
    folder = write_pipeline_folder(tmp_path, "KandinskyPipeline")
    with pytest.raises(ModelLoadError, match=r"KandinskyPipeline.*supported: FluxPipeline"):
        detect_family(folder)


def test_detect_family_says_which_file_is_missing_when_folder_is_not_a_pipeline(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"model_index\.json is missing"):
        detect_family(tmp_path)


def test_inspect_pipeline_derives_native_size_from_unet_sample_size_when_sd15(tmp_path: Path) -> None:
    traits = inspect_pipeline(write_pipeline_folder(tmp_path, "StableDiffusionPipeline"))
    assert (traits.native_size, traits.size_multiple, traits.max_side) == (512, 8, None)
    assert (traits.default_steps, traits.default_guidance_scale, traits.uses_guidance_scale) == (50, 7.5, True)


def test_inspect_pipeline_gives_sd2_its_768_size_when_unet_sample_size_is_96(tmp_path: Path) -> None:
    traits = inspect_pipeline(write_pipeline_folder(tmp_path, "StableDiffusionPipeline",
                                                    denoiser_config={"sample_size": 96}))
    assert traits.native_size == 768


def test_inspect_pipeline_reads_sdxl_turbo_size_from_its_config_when_sample_size_is_64(tmp_path: Path) -> None:
    traits = inspect_pipeline(write_pipeline_folder(tmp_path, "StableDiffusionXLPipeline"))
    assert (traits.native_size, traits.default_guidance_scale) == (512, 5.0)


def test_inspect_pipeline_bounds_sd3_sides_by_position_embedding_when_sd3(tmp_path: Path) -> None:
    folder = write_pipeline_folder(tmp_path, "StableDiffusion3Pipeline", "transformer",
                                   {"sample_size": 128, "patch_size": 2, "pos_embed_max_size": 192})
    traits = inspect_pipeline(folder)
    assert (traits.native_size, traits.size_multiple, traits.max_side) == (1024, 16, 3072)
    assert (traits.default_steps, traits.default_guidance_scale, traits.max_sequence_length) == (28, 7.0, 256)


def test_inspect_pipeline_gives_schnell_defaults_when_flux_has_no_guidance_embedding(tmp_path: Path) -> None:
    folder = write_pipeline_folder(tmp_path, "FluxPipeline", "transformer", {"guidance_embeds": False})
    traits = inspect_pipeline(folder)
    assert (traits.default_steps, traits.default_guidance_scale, traits.max_sequence_length) == (4, 0.0, 256)
    assert not traits.uses_guidance_scale
    assert (traits.native_size, traits.size_multiple) == (1024, 16)


def test_inspect_pipeline_gives_dev_defaults_when_flux_embeds_guidance(tmp_path: Path) -> None:
    folder = write_pipeline_folder(tmp_path, "FluxPipeline", "transformer", {"guidance_embeds": True})
    traits = inspect_pipeline(folder)
    assert (traits.default_steps, traits.default_guidance_scale, traits.max_sequence_length) == (28, 3.5, 512)
    assert traits.uses_guidance_scale


def test_inspect_pipeline_scales_size_multiple_with_the_vae_when_vae_has_fewer_blocks(tmp_path: Path) -> None:
    traits = inspect_pipeline(write_pipeline_folder(tmp_path, "StableDiffusionPipeline", vae_blocks=3))
    assert (traits.size_multiple, traits.native_size) == (4, 256)
