"""The pipeline families we serve, and what a pipeline folder says about itself.

A family is recognised from ``model_index.json``'s ``_class_name`` and its defaults come from the components'
own ``config.json`` files, never from substrings of a model's name: ``sdxl-turbo`` is an SDXL pipeline whose
operator sets its 1-step defaults in ``config.pbtxt``, and FLUX.1-schnell differs from FLUX.1-dev by having no
guidance embedding in its transformer config. Nothing here imports torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelLoadError


@dataclass(frozen=True)
class Family:
    """What is common to every pipeline of one diffusers class."""

    name: str
    pipeline_class: str
    denoiser: str
    """Folder of the denoising network: ``unet`` or ``transformer``."""
    latent_patch: int
    """How many latent pixels one token spans per side (SD3 patches, FLUX 2x2 packing); 1 for UNets."""
    default_steps: int
    default_guidance_scale: float
    takes_negative_prompt: bool
    """Whether the pipeline uses a negative prompt with no extra setting (FLUX needs ``true_cfg_scale > 1``)."""
    default_max_sequence_length: int | None = None
    """T5 prompt length in tokens, for families that have a T5 encoder."""


SD15 = Family("sd15", "StableDiffusionPipeline", "unet", 1, 50, 7.5, takes_negative_prompt=True)
SDXL = Family("sdxl", "StableDiffusionXLPipeline", "unet", 1, 50, 5.0, takes_negative_prompt=True)
SD3 = Family(
    "sd3", "StableDiffusion3Pipeline", "transformer", 2, 28, 7.0, takes_negative_prompt=True,
    default_max_sequence_length=256,
)
# FLUX.1-dev defaults (diffusers' FluxPipeline: 28 steps, guidance 3.5, 512 T5 tokens); schnell's come from
# ``FLUX_WITHOUT_GUIDANCE_EMBEDDING`` below.
FLUX = Family(
    "flux", "FluxPipeline", "transformer", 2, 28, 3.5, takes_negative_prompt=False,
    default_max_sequence_length=512,
)
FAMILIES: tuple[Family, ...] = (SD15, SDXL, SD3, FLUX)
FAMILY_BY_PIPELINE_CLASS = {family.pipeline_class: family for family in FAMILIES}

# A guidance-distilled FLUX (schnell) has no guidance embedding: 4 steps, no guidance, 256 T5 tokens, as
# published with the model (https://huggingface.co/black-forest-labs/FLUX.1-schnell).
FLUX_WITHOUT_GUIDANCE_EMBEDDING = {"steps": 4, "guidance_scale": 0.0, "max_sequence_length": 256}

# FluxPipeline has no sample_size in its transformer config; it uses a fixed 128-latent default side.
_FLUX_DEFAULT_LATENT_SIDE = 128


@dataclass(frozen=True)
class PipelineTraits:
    """Facts about one pipeline, read from its folder before any weight is loaded."""

    family: Family
    native_size: int
    """Default side in pixels: the denoiser's training resolution."""
    size_multiple: int
    """Width and height must be multiples of this: VAE downscale times the latent patch."""
    max_side: int | None
    """Largest side the architecture accepts (SD3's position embedding), or None when unbounded."""
    uses_guidance_scale: bool
    """False for guidance-distilled FLUX: ``guidance_scale`` would be silently ignored."""
    default_steps: int
    default_guidance_scale: float
    max_sequence_length: int | None


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path} is missing: not a complete diffusers pipeline folder") from None
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{path} cannot be read as JSON: {error}") from error
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} holds {type(data).__name__}, expected a JSON object")
    return data


def detect_family(pipeline_folder: Path) -> Family:
    """The family of the pipeline saved in ``pipeline_folder``, from ``model_index.json``."""
    index = read_json(pipeline_folder / "model_index.json")
    class_name = index.get("_class_name")
    family = FAMILY_BY_PIPELINE_CLASS.get(str(class_name))
    if family is None:
        supported = ", ".join(sorted(FAMILY_BY_PIPELINE_CLASS))
        raise ModelLoadError(
            f"{pipeline_folder / 'model_index.json'}: _class_name={class_name!r} is not a supported "
            f"text-to-image pipeline; supported: {supported}"
        )
    return family


def inspect_pipeline(pipeline_folder: Path) -> PipelineTraits:
    """Family, native size, size rules and default settings of the pipeline in ``pipeline_folder``."""
    family = detect_family(pipeline_folder)
    vae_config = read_json(pipeline_folder / "vae" / "config.json")
    denoiser_config = read_json(pipeline_folder / family.denoiser / "config.json")
    # Every diffusers pipeline derives its VAE factor this way (AutoencoderKL halves per extra block).
    vae_scale_factor = 2 ** (len(vae_config.get("block_out_channels", [0] * 4)) - 1)
    latent_patch = family.latent_patch
    if family is SD3:  # SD3 variants may patch differently; FLUX's packing is fixed by its pipeline
        latent_patch = int(denoiser_config.get("patch_size", latent_patch))
    size_multiple = vae_scale_factor * latent_patch

    native_latent_side = _FLUX_DEFAULT_LATENT_SIDE if family is FLUX else int(denoiser_config["sample_size"])
    native_size = native_latent_side * vae_scale_factor

    max_side = None
    if family is SD3 and denoiser_config.get("pos_embed_max_size"):
        max_side = int(denoiser_config["pos_embed_max_size"]) * latent_patch * vae_scale_factor

    steps, guidance, max_sequence_length = (
        family.default_steps, family.default_guidance_scale, family.default_max_sequence_length
    )
    uses_guidance_scale = True
    if family is FLUX and not denoiser_config.get("guidance_embeds", False):
        uses_guidance_scale = False
        steps = int(FLUX_WITHOUT_GUIDANCE_EMBEDDING["steps"])
        guidance = float(FLUX_WITHOUT_GUIDANCE_EMBEDDING["guidance_scale"])
        max_sequence_length = int(FLUX_WITHOUT_GUIDANCE_EMBEDDING["max_sequence_length"])

    return PipelineTraits(
        family=family,
        native_size=native_size,
        size_multiple=size_multiple,
        max_side=max_side,
        uses_guidance_scale=uses_guidance_scale,
        default_steps=steps,
        default_guidance_scale=guidance,
        max_sequence_length=max_sequence_length,
    )
