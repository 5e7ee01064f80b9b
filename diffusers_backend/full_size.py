"""Random-weight pipelines with the real, full-size architectures of the four families we serve.

Timing the serving path on a GPU needs each family's real compute and memory shape, but a GPU session has no
internet and no weights. So the component configs below are the published ``config.json`` values of the models
we serve (SD1.5, SDXL base 1.0, SD3 medium, FLUX.1-schnell), the weights are random (seeded), and the tokenizers
and schedulers are the offline ones of :mod:`.tiny_pipelines`. Their token ids all lie inside the real
vocabularies and the pipelines pad every prompt to a fixed length (77 CLIP tokens, ``max_sequence_length`` T5
tokens), so every tensor a timed run touches has its real shape; only the images are noise.

Nothing here allocates weights unless asked: :func:`parameter_counts` builds on the meta device (a test checks
each component against :data:`PUBLISHED_PARAMETER_COUNTS`), and :func:`build_full_size_pipeline` builds straight
on the target device in the target dtype, so a 12B FLUX transformer in bf16 never passes through CPU memory.

Config sources: each comment names the Hugging Face model repository and file. The values were confirmed against
public copies of those files found with a code search (the hub itself is out of reach here); where only part of a
file could be seen, the comment says which values rest on our own knowledge of it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel
from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_pndm import PNDMScheduler
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedModel,
    T5Config,
    T5EncoderModel,
)

from .tiny import TINY_FAMILIES
from .tiny_pipelines import (
    _CLIP_BOS_ID,
    _CLIP_EOS_ID,
    _CLIP_MAX_LENGTH,
    _FLUX_FLOW_CONFIG,
    _SD3_FLOW_CONFIG,
    _SD15_PNDM_CONFIG,
    _SDXL_EULER_CONFIG,
    _build_clip_tokenizer,
    _build_t5_tokenizer,
)

FULL_SIZE_FAMILIES: tuple[str, ...] = TINY_FAMILIES

_BUILD_SEED = 0

# --- Text encoders ----------------------------------------------------------

# The published CLIP configs carry the real tokenizer's ids (SD1.5: bos 0, eos 2, pad 1, from our knowledge of
# the file, not confirmed by search). Ours are the offline tokenizer's: CLIP pools its output at the first
# eos_token_id, so with a foreign id the pooled embedding would come from position 0 for every prompt (see
# tiny_pipelines). Token ids change no shape and no parameter count.
_OFFLINE_CLIP_TOKEN_IDS: dict[str, Any] = {
    "bos_token_id": _CLIP_BOS_ID,
    "eos_token_id": _CLIP_EOS_ID,
    "pad_token_id": _CLIP_EOS_ID,
}

# CLIP ViT-L/14 text tower: stable-diffusion-v1-5/stable-diffusion-v1-5 text_encoder/config.json, and the same
# values in stable-diffusion-xl-base-1.0 text_encoder/, stable-diffusion-3-medium-diffusers text_encoder/ and
# FLUX.1-schnell text_encoder/. SD1.5, SDXL and FLUX load it as CLIPTextModel, SD3 as CLIPTextModelWithProjection.
CLIP_VIT_L_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": _CLIP_MAX_LENGTH,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    **_OFFLINE_CLIP_TOKEN_IDS,
}

# OpenCLIP ViT-bigG/14 text tower with its projection: stabilityai/stable-diffusion-xl-base-1.0
# text_encoder_2/config.json (the same in stable-diffusion-3-medium-diffusers text_encoder_2/). Note plain
# "gelu", not CLIP-L's "quick_gelu".
CLIP_VIT_BIGG_CONFIG: dict[str, Any] = {
    **CLIP_VIT_L_CONFIG,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}

# T5 v1.1 XXL, encoder only: google/t5-v1_1-xxl config.json, as shipped in stable-diffusion-3-medium-diffusers
# text_encoder_3/ and FLUX.1-schnell text_encoder_2/. dropout_rate is 0.1 there; 0.0 here changes no shape and
# keeps a module accidentally left in train mode deterministic. The decoder-only fields are left out.
T5_XXL_CONFIG: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-6,
    "dropout_rate": 0.0,
    "is_encoder_decoder": False,
    "use_cache": False,
    "tie_word_embeddings": False,
    # The real T5 ids, which are also the offline T5 tokenizer's.
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}

# --- VAEs -------------------------------------------------------------------

# stable-diffusion-v1-5/stable-diffusion-v1-5 vae/config.json. scaling_factor is not in that file: 0.18215 is
# AutoencoderKL's default, which is SD1.5's value.
SD15_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

# stabilityai/stable-diffusion-xl-base-1.0 vae/config.json: SD1.5's architecture, another latent scale, and
# force_upcast (the pipeline decodes in fp32 when the rest runs in fp16).
SDXL_VAE_CONFIG: dict[str, Any] = {
    **SD15_VAE_CONFIG,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}

# 16 latent channels and no quant convolutions: stabilityai/stable-diffusion-3-medium-diffusers vae/config.json.
SD3_VAE_CONFIG: dict[str, Any] = {
    **SDXL_VAE_CONFIG,
    "latent_channels": 16,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
}

# black-forest-labs/FLUX.1-schnell vae/config.json: SD3's architecture with FLUX's latent normalisation.
FLUX_VAE_CONFIG: dict[str, Any] = {
    **SD3_VAE_CONFIG,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
}

# --- Denoisers --------------------------------------------------------------

# stable-diffusion-v1-5/stable-diffusion-v1-5 unet/config.json.
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "cross_attention_dim": CLIP_VIT_L_CONFIG["hidden_size"],
    # Legacy name: the number of heads, not their width.
    "attention_head_dim": 8,
}

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json.
SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "use_linear_projection": True,
    # The hidden states of both CLIP towers, concatenated.
    "cross_attention_dim": CLIP_VIT_L_CONFIG["hidden_size"] + CLIP_VIT_BIGG_CONFIG["hidden_size"],
    "attention_head_dim": (5, 10, 20),
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    # Six size/crop ids of 256 each, plus bigG's 1280-wide projection.
    "projection_class_embeddings_input_dim": 2816,
}

# stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json (SD3 medium, not 3.5: no qk_norm and no
# dual-attention layers).
SD3_TRANSFORMER_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    # num_attention_heads * attention_head_dim.
    "caption_projection_dim": 1536,
    # T5-XXL's width.
    "joint_attention_dim": T5_XXL_CONFIG["d_model"],
    # Both CLIP projections, concatenated.
    "pooled_projection_dim": CLIP_VIT_L_CONFIG["projection_dim"] + CLIP_VIT_BIGG_CONFIG["projection_dim"],
    # Largest side = 192 * patch_size * 8 = 3072 px.
    "pos_embed_max_size": 192,
}

# black-forest-labs/FLUX.1-schnell transformer/config.json: FLUX.1-dev's, without the guidance embedding.
FLUX_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    # 2x2-packed latents of the 16-channel VAE.
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": T5_XXL_CONFIG["d_model"],
    # FLUX pools CLIPTextModel's pooler output only.
    "pooled_projection_dim": CLIP_VIT_L_CONFIG["hidden_size"],
    "guidance_embeds": False,
    # Sums to attention_head_dim.
    "axes_dims_rope": (16, 56, 56),
}

# --- Published parameter counts ---------------------------------------------


@dataclass(frozen=True)
class PublishedCount:
    """A component's parameter count as published, and where it was published."""

    parameters: int
    source: str


_SD15_COUNT_SOURCE = (
    "fast.ai forum 'Stable diffusion: parameter budget allocation' (forums.fast.ai/t/101515), counted from the "
    "stable-diffusion-v1-5 checkpoint; repeated in many public training logs"
)
_CLIP_L_COUNT = PublishedCount(123_060_480, _SD15_COUNT_SOURCE)
_SD_VAE_COUNT = PublishedCount(83_653_863, _SD15_COUNT_SOURCE)
_BIGG_COUNT = PublishedCount(
    694_659_840,
    "public parameter audits of stable-diffusion-xl-base-1.0 text_encoder_2 and SD3/SD3.5 text_encoder_2 (among "
    "them ai-dynamo/aitune docs/guides/aot_inspect.md); the SDXL report (arXiv:2307.01952) gives 817M for both "
    "SDXL text encoders together (quoted from memory, not confirmed by search)",
)
_T5_XXL_COUNT = PublishedCount(
    4_762_310_656,
    "T5 v1.1 XXL encoder (Raffel et al. 2020, google/t5-v1_1-xxl): 4.76B of the 11.1B encoder-decoder; exact "
    "count from public parameter audits of SD3 text_encoder_3 and FLUX.1 text_encoder_2",
)
_FLOW_VAE_COUNT = PublishedCount(
    83_819_683,
    "public parameter audits of stable-diffusion-3.5-medium and FLUX.1-schnell vae/ (the SD3 and FLUX VAEs share "
    "one architecture)",
)

PUBLISHED_PARAMETER_COUNTS: dict[str, dict[str, PublishedCount]] = {
    "sd15": {
        "unet": PublishedCount(859_520_964, _SD15_COUNT_SOURCE),
        "vae": _SD_VAE_COUNT,
        "text_encoder": _CLIP_L_COUNT,
    },
    "sdxl": {
        "unet": PublishedCount(
            2_567_463_684,
            "public audits of the sd_xl_base_1.0 checkpoint (1680 tensors, 2,567,463,684 parameters); the SDXL "
            "report (arXiv:2307.01952) rounds it to 2.6B (quoted from memory, not confirmed by search)",
        ),
        "vae": _SD_VAE_COUNT,
        "text_encoder": _CLIP_L_COUNT,
        "text_encoder_2": _BIGG_COUNT,
    },
    "sd3": {
        "transformer": PublishedCount(
            2_028_328_000,
            "Stability AI's SD3 medium model card: a '2 billion parameter' MMDiT (2.03B, 1.4% off the rounded "
            "figure); exact count from NVIDIA's ai-dynamo/aitune docs/guides/aot_inspect.md, which inspects "
            "stable-diffusion-3-medium-diffusers (same text-encoder counts as here)",
        ),
        "vae": _FLOW_VAE_COUNT,
        "text_encoder": PublishedCount(
            123_650_304,
            "ai-dynamo/aitune docs/guides/aot_inspect.md (stable-diffusion-3-medium-diffusers text_encoder: CLIP-L "
            "plus its 768x768 projection, 123,060,480 + 589,824)",
        ),
        "text_encoder_2": _BIGG_COUNT,
        "text_encoder_3": _T5_XXL_COUNT,
    },
    "flux": {
        "transformer": PublishedCount(
            11_891_178_560,
            "Black Forest Labs' FLUX.1-schnell model card: a '12 billion parameter rectified flow transformer'; "
            "exact count from public audits of the FLUX.1-schnell checkpoint (FLUX.1-dev: 11,901,408,320, the "
            "difference being dev's guidance embedding)",
        ),
        "vae": _FLOW_VAE_COUNT,
        "text_encoder": _CLIP_L_COUNT,
        "text_encoder_2": _T5_XXL_COUNT,
    },
}
assert tuple(PUBLISHED_PARAMETER_COUNTS) == FULL_SIZE_FAMILIES

# --- Components and pipelines -----------------------------------------------


def _clip_text_model(config: Mapping[str, Any]) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(**config))


def _clip_text_model_with_projection(config: Mapping[str, Any]) -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(CLIPTextConfig(**config))


def _t5_encoder(config: Mapping[str, Any]) -> T5EncoderModel:
    return T5EncoderModel(T5Config(**config))


@dataclass(frozen=True)
class _FamilyLayout:
    """How one family's pipeline is put together."""

    pipeline_class: Callable[..., DiffusionPipeline]
    models: Mapping[str, Callable[[], torch.nn.Module]]
    """Pipeline argument name -> builder of that model, in the pipeline's own order."""
    other_components: Callable[[], dict[str, Any]]
    """Tokenizers, scheduler and flags: everything that holds no weights."""


_CLIP_VIT_L = functools.partial(_clip_text_model, CLIP_VIT_L_CONFIG)
_CLIP_VIT_BIGG_WITH_PROJECTION = functools.partial(_clip_text_model_with_projection, CLIP_VIT_BIGG_CONFIG)
_T5_XXL = functools.partial(_t5_encoder, T5_XXL_CONFIG)

_LAYOUTS: dict[str, _FamilyLayout] = {
    "sd15": _FamilyLayout(
        StableDiffusionPipeline,
        {
            "unet": functools.partial(UNet2DConditionModel, **SD15_UNET_CONFIG),
            "vae": functools.partial(AutoencoderKL, **SD15_VAE_CONFIG),
            "text_encoder": _CLIP_VIT_L,
        },
        lambda: {
            "tokenizer": _build_clip_tokenizer(),
            "scheduler": PNDMScheduler(**_SD15_PNDM_CONFIG),
            # As in the tiny pipelines: the safety checker is a whole CLIP vision model that serving leaves out.
            "safety_checker": None,
            "feature_extractor": None,
            "requires_safety_checker": False,
        },
    ),
    "sdxl": _FamilyLayout(
        StableDiffusionXLPipeline,
        {
            "unet": functools.partial(UNet2DConditionModel, **SDXL_UNET_CONFIG),
            "vae": functools.partial(AutoencoderKL, **SDXL_VAE_CONFIG),
            "text_encoder": _CLIP_VIT_L,
            "text_encoder_2": _CLIP_VIT_BIGG_WITH_PROJECTION,
        },
        lambda: {
            "tokenizer": _build_clip_tokenizer(),
            "tokenizer_2": _build_clip_tokenizer(),
            "scheduler": EulerDiscreteScheduler(**_SDXL_EULER_CONFIG),
            "add_watermarker": False,
        },
    ),
    "sd3": _FamilyLayout(
        StableDiffusion3Pipeline,
        {
            "transformer": functools.partial(SD3Transformer2DModel, **SD3_TRANSFORMER_CONFIG),
            "vae": functools.partial(AutoencoderKL, **SD3_VAE_CONFIG),
            "text_encoder": functools.partial(_clip_text_model_with_projection, CLIP_VIT_L_CONFIG),
            "text_encoder_2": _CLIP_VIT_BIGG_WITH_PROJECTION,
            "text_encoder_3": _T5_XXL,
        },
        lambda: {
            "tokenizer": _build_clip_tokenizer(),
            "tokenizer_2": _build_clip_tokenizer(),
            "tokenizer_3": _build_t5_tokenizer(),
            "scheduler": FlowMatchEulerDiscreteScheduler(**_SD3_FLOW_CONFIG),
        },
    ),
    "flux": _FamilyLayout(
        FluxPipeline,
        {
            "transformer": functools.partial(FluxTransformer2DModel, **FLUX_TRANSFORMER_CONFIG),
            "vae": functools.partial(AutoencoderKL, **FLUX_VAE_CONFIG),
            "text_encoder": _CLIP_VIT_L,
            "text_encoder_2": _T5_XXL,
        },
        lambda: {
            "tokenizer": _build_clip_tokenizer(),
            "tokenizer_2": _build_t5_tokenizer(),
            "scheduler": FlowMatchEulerDiscreteScheduler(**_FLUX_FLOW_CONFIG),
        },
    ),
}
assert tuple(_LAYOUTS) == FULL_SIZE_FAMILIES
assert all(set(_LAYOUTS[family].models) == set(PUBLISHED_PARAMETER_COUNTS[family]) for family in _LAYOUTS)


def check_full_size_family(family: str) -> None:
    if family not in FULL_SIZE_FAMILIES:
        raise ValueError(f"unknown full-size pipeline family {family!r}; expected one of {FULL_SIZE_FAMILIES}")


def parameter_counts(family: str) -> dict[str, int]:
    """Parameters per model component of ``family``'s full-size pipeline, counted without allocating them.

    Every component is built on the meta device, where tensors have shapes but no storage, so even FLUX's 12B
    transformer costs a few hundred megabytes of Python objects and a few seconds.
    """
    check_full_size_family(family)
    counts: dict[str, int] = {}
    for name, build in _LAYOUTS[family].models.items():
        with torch.device("meta"):
            model = build()
        counts[name] = sum(parameter.numel() for parameter in model.parameters())
        del model
    return counts


@contextlib.contextmanager
def _seeded_construction_on(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Create every tensor on ``device`` in ``dtype``, from a fixed seed, and restore the caller's torch state.

    Building under ``torch.device(device)`` with ``dtype`` as the default dtype is what lets a 24 GB bf16
    FLUX transformer appear on the GPU directly, never as 48 GB of fp32 on the CPU first. The CPU RNG and the
    target GPU's RNG are forked so the caller's random streams do not move (``torch.manual_seed`` also reseeds
    any other GPU of the machine).
    """
    forked_gpus: list[int] = []
    if device.type == "cuda":
        forked_gpus.append(device.index if device.index is not None else torch.cuda.current_device())
    previous_default_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=forked_gpus), device:
        torch.manual_seed(_BUILD_SEED)
        torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(previous_default_dtype)


def _settle_as_from_pretrained_would(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Give ``model`` the devices and dtypes that ``from_pretrained(dtype=dtype)`` would give it.

    Construction under a default dtype misses tensors created with an explicit dtype (SD3's position embedding
    is built in fp32 but saved in the checkpoint, so it loads in ``dtype``), and a few are computed on the CPU
    whatever the default device. A fp32 embedding would promote SD3's whole activation stream to fp32.
    Conversely, transformers keeps T5's ``wo`` projections in fp32 when loading in fp16 (their activations
    overflow fp16). A timing model should run the same kernels as the served one.
    """
    # nn.Module's own .to: diffusers' override logs a warning about fp32 modules on every dtype cast, even for
    # models that keep none (diffusers 0.42). Tensors already in place are left as they are.
    torch.nn.Module.to(model, device=device, dtype=dtype)
    if not isinstance(model, PreTrainedModel):
        return
    keep_in_fp32: set[str] = set()
    if dtype == torch.float16:
        keep_in_fp32.update(getattr(model, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        keep_in_fp32.update(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in keep_in_fp32:
            module.to(torch.float32)


def build_full_size_pipeline(
    family: str, dtype: torch.dtype = torch.float16, device: str | torch.device = "cuda"
) -> DiffusionPipeline:
    """Build ``family``'s pipeline with its real full-size architecture and random weights on ``device``.

    Meant for timing on a GPU without downloading weights: the weights are seeded noise (two builds on the same
    device and stack are identical), the models are created on ``device`` in ``dtype`` directly and are in eval
    mode, and T5's fp16-sensitive layers stay fp32 exactly as after ``from_pretrained``. The images it makes are
    noise. ``device="meta"`` builds the whole pipeline without any weight memory, to check that it assembles.
    """
    check_full_size_family(family)
    target = torch.device(device)
    layout = _LAYOUTS[family]
    models: dict[str, torch.nn.Module] = {}
    with _seeded_construction_on(target, dtype):
        for name, build in layout.models.items():
            model = build()
            _settle_as_from_pretrained_would(model, target, dtype)
            # Freshly constructed models start in train mode; from_pretrained gives eval mode.
            models[name] = model.eval()
    return layout.pipeline_class(**models, **layout.other_components())
