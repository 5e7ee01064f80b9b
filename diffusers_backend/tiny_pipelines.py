"""The tiny random-weight pipelines themselves (imports torch, diffusers and transformers).

Each pipeline has real component classes and wiring but only a few hundred thousand random parameters, so
tests can load and run it on a CPU in well under a second. Nothing is downloaded: tokenizer files are written
by hand into a temporary folder and loaded with ``from_pretrained``, the construction path that behaves the
same on transformers 4.x and 5.x (direct constructor arguments do not).

The configs follow the verified reference in ``shared/docs/tiny-pipelines.md``; the comments below repeat the
constraints that tie their numbers together. Caching and the command line live in :mod:`.tiny`, which does
not import torch, so that finding a cached build costs no heavy import.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import string
import tempfile
from collections.abc import Iterator
from typing import Any

import torch

# Classes come from their defining modules rather than the top-level
# ``diffusers`` namespace: for a type checker that namespace resolves to
# untyped placeholder classes (diffusers' "dummy objects"). At runtime both
# names are the same class.
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
from sentencepiece import sentencepiece_model_pb2
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedTokenizerBase,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from .tiny import TINY_FAMILIES, check_family

_BUILD_SEED = 0

# --- Component configs ------------------------------------------------------

_CLIP_START_OF_TEXT = "<|startoftext|>"
_CLIP_END_OF_TEXT = "<|endoftext|>"
# 256 byte symbols + 256 end-of-word byte symbols, then bos and eos.
_CLIP_BOS_ID = 512
_CLIP_EOS_ID = 513
_CLIP_VOCAB_SIZE = 514
# The pipelines always pad/truncate CLIP prompts to 77 tokens.
_CLIP_MAX_LENGTH = 77

# bos/eos must be the tokenizer's ids: CLIP pools its output at the first
# eos_token_id. With the stock 49407 (absent from our vocab) the pooled
# embedding comes from position 0 and is identical for every prompt, which
# would make SDXL/SD3/FLUX silently ignore the prompt's pooled conditioning.
_CLIP_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": _CLIP_VOCAB_SIZE,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": _CLIP_MAX_LENGTH,
    "projection_dim": 32,
    "bos_token_id": _CLIP_BOS_ID,
    "eos_token_id": _CLIP_EOS_ID,
    "pad_token_id": _CLIP_EOS_ID,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "dropout": 0.0,
}

_T5_PAD_ID = 0
_T5_EOS_ID = 1
_T5_UNK_ID = 2
_T5_MAX_LENGTH = 512
# Every printable ASCII character except whitespace, as a word-initial piece
# ("▁c") and a word-internal piece ("c"): 4 special + 2 * 94 = 192 pieces.
_T5_CHARACTERS = string.ascii_letters + string.digits + string.punctuation
_T5_VOCAB_SIZE = 4 + 2 * len(_T5_CHARACTERS)

# Dropout 0: the T5 default (0.1) would make a module left in train mode
# nondeterministic; we also .eval() everything, this is belt and braces.
_T5_CONFIG: dict[str, Any] = {
    "vocab_size": _T5_VOCAB_SIZE,
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 32,
    "dropout_rate": 0.0,
    "feed_forward_proj": "gated-gelu",
    "is_encoder_decoder": False,
    "use_cache": False,
    "pad_token_id": _T5_PAD_ID,
    "eos_token_id": _T5_EOS_ID,
    "decoder_start_token_id": _T5_PAD_ID,
    "tie_word_embeddings": False,
}
# SD3 pads the CLIP states (2 * 32 wide) to the T5 width; a narrower T5 would
# silently crop them, so SD3's T5 is 64 wide.
_SD3_T5_D_MODEL = 64

# Four blocks give the usual 8x latent downscale. Two blocks also work but make
# 256x256 SD1.5 inference ~23x slower. norm_num_groups must divide every
# channel count (the default 32 does not).
_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (8, 8, 16, 16),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 256,
    "latent_channels": 4,
}
# The SD3 and FLUX VAEs have 16 latent channels and no quant convolutions.
_FLOW_VAE_OVERRIDES: dict[str, Any] = {
    "latent_channels": 16,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}

# Both UNets share the layout: two levels, cross-attention on the lower one, 32 latent pixels (256 px).
_UNET_LAYOUT: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (16, 32),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
}

_SD15_UNET_CONFIG: dict[str, Any] = {
    **_UNET_LAYOUT,
    "cross_attention_dim": _CLIP_TEXT_CONFIG["hidden_size"],
    # Legacy name: this is the number of heads, not their width.
    "attention_head_dim": 4,
}

_SDXL_ADDITION_TIME_EMBED_DIM = 8
_SDXL_UNET_CONFIG: dict[str, Any] = {
    **_UNET_LAYOUT,
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "transformer_layers_per_block": (1, 1),
    # The two CLIP encoders' hidden states are concatenated.
    "cross_attention_dim": 2 * _CLIP_TEXT_CONFIG["hidden_size"],
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": _SDXL_ADDITION_TIME_EMBED_DIM,
    # Six size/crop ids, each embedded, plus the second encoder's projection.
    "projection_class_embeddings_input_dim": 6 * _SDXL_ADDITION_TIME_EMBED_DIM
    + _CLIP_TEXT_CONFIG["projection_dim"],
}

_SD3_TRANSFORMER_CONFIG: dict[str, Any] = {
    "sample_size": 32,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    # Must equal num_attention_heads * attention_head_dim.
    "caption_projection_dim": 32,
    # Must equal the T5 width.
    "joint_attention_dim": _SD3_T5_D_MODEL,
    # Both CLIP projections are concatenated.
    "pooled_projection_dim": 2 * _CLIP_TEXT_CONFIG["projection_dim"],
    # Largest side = 96 * patch_size * 8 = 1536 px.
    "pos_embed_max_size": 96,
}

_FLUX_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    # Latents are packed 2x2, so 4 * the VAE's 16 latent channels.
    "in_channels": 4 * _FLOW_VAE_OVERRIDES["latent_channels"],
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    # Must equal the T5 width.
    "joint_attention_dim": _T5_CONFIG["d_model"],
    # FLUX pools only CLIPTextModel's pooler output (hidden_size wide).
    "pooled_projection_dim": _CLIP_TEXT_CONFIG["hidden_size"],
    # Mirrors FLUX.1-schnell, which (unlike FLUX.1-dev) has no guidance
    # embedding: guidance_scale has no effect on it.
    "guidance_embeds": False,
    # Must sum to attention_head_dim.
    "axes_dims_rope": (4, 4, 8),
}

_SD_BETA_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
}
_SD15_PNDM_CONFIG: dict[str, Any] = {
    **_SD_BETA_SCHEDULE,
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
}
_SDXL_EULER_CONFIG: dict[str, Any] = {**_SD_BETA_SCHEDULE, "timestep_spacing": "leading"}
_SD3_FLOW_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}
# The values of FLUX.1-schnell's own scheduler: no shift at all, static
# schedule (FLUX.1-dev instead uses dynamic, resolution-dependent shifting).
_FLUX_FLOW_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


# --- Tokenizers -------------------------------------------------------------


def _gpt2_byte_symbols() -> list[str]:
    """Return GPT-2's printable stand-in character for each byte value 0..255.

    Byte-level BPE (CLIP's tokenizer) maps every byte to a visible unicode
    character so that no byte is whitespace or a control character.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbol_for_byte: dict[int, str] = {byte: chr(byte) for byte in printable}
    next_free_code_point = 256
    for byte in range(256):
        if byte not in symbol_for_byte:
            symbol_for_byte[byte] = chr(next_free_code_point)
            next_free_code_point += 1
    return [symbol_for_byte[byte] for byte in range(256)]


def _clip_vocabulary() -> dict[str, int]:
    """Character-level CLIP vocabulary: every byte, alone and word-final."""
    byte_symbols = _gpt2_byte_symbols()
    vocabulary = {symbol: index for index, symbol in enumerate(byte_symbols)}
    vocabulary.update({symbol + "</w>": 256 + index for index, symbol in enumerate(byte_symbols)})
    vocabulary[_CLIP_START_OF_TEXT] = _CLIP_BOS_ID
    vocabulary[_CLIP_END_OF_TEXT] = _CLIP_EOS_ID
    assert len(vocabulary) == _CLIP_VOCAB_SIZE
    return vocabulary


def _build_clip_tokenizer() -> CLIPTokenizer:
    # Loading vocab.json + merges.txt from a folder is the one construction
    # path that behaves the same on transformers 4.x and 5.x (5.x silently
    # ignores vocab_file=/merges_file= keywords).
    with tempfile.TemporaryDirectory(prefix="tiny-clip-tokenizer-") as folder_name:
        folder = pathlib.Path(folder_name)
        (folder / "vocab.json").write_text(
            json.dumps(_clip_vocabulary(), ensure_ascii=False), encoding="utf-8"
        )
        # No merges: every word tokenizes character by character.
        (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        tokenizer: CLIPTokenizer = CLIPTokenizer.from_pretrained(
            folder, model_max_length=_CLIP_MAX_LENGTH, local_files_only=True
        )
    _forget_source_folder(tokenizer)
    return tokenizer


def _t5_sentencepiece_model() -> bytes:
    """Serialise a hand-made SentencePiece unigram model (no training corpus)."""
    # protobuf creates the message classes at runtime, so there is nothing for
    # a type checker to see in the generated module.
    sentencepiece_proto: Any = sentencepiece_model_pb2
    model = sentencepiece_proto.ModelProto()
    piece_type = sentencepiece_proto.ModelProto.SentencePiece
    pieces: list[tuple[str, float, int]] = [
        ("<pad>", 0.0, piece_type.CONTROL),
        ("</s>", 0.0, piece_type.CONTROL),
        ("<unk>", 0.0, piece_type.UNKNOWN),
        ("▁", -2.0, piece_type.NORMAL),
    ]
    for character in _T5_CHARACTERS:
        # Word-initial pieces score higher, so "▁a" beats "▁" + "a".
        pieces.append(("▁" + character, -3.0, piece_type.NORMAL))
        pieces.append((character, -3.5, piece_type.NORMAL))
    assert len(pieces) == _T5_VOCAB_SIZE
    for text, score, kind in pieces:
        piece = model.pieces.add()
        piece.piece = text
        piece.score = score
        piece.type = kind

    model.trainer_spec.model_type = sentencepiece_proto.TrainerSpec.UNIGRAM
    model.trainer_spec.vocab_size = _T5_VOCAB_SIZE
    model.trainer_spec.pad_id = _T5_PAD_ID
    model.trainer_spec.eos_id = _T5_EOS_ID
    model.trainer_spec.unk_id = _T5_UNK_ID
    model.trainer_spec.bos_id = -1  # T5 has no bos token.
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.add_dummy_prefix = True
    model.normalizer_spec.remove_extra_whitespaces = True
    model.normalizer_spec.escape_whitespaces = True
    serialized: bytes = model.SerializeToString()
    return serialized


def _build_t5_tokenizer() -> T5Tokenizer:
    # On transformers 5.x T5Tokenizer is the tokenizers-backed (fast) class;
    # T5TokenizerFast is only a runtime alias of it.
    with tempfile.TemporaryDirectory(prefix="tiny-t5-tokenizer-") as folder_name:
        folder = pathlib.Path(folder_name)
        (folder / "spiece.model").write_bytes(_t5_sentencepiece_model())
        # extra_ids=0: the default adds 100 <extra_id_N> tokens beyond the
        # text encoder's 192-entry embedding table (IndexError on use).
        tokenizer: T5Tokenizer = T5Tokenizer.from_pretrained(
            folder, extra_ids=0, model_max_length=_T5_MAX_LENGTH, local_files_only=True
        )
    _forget_source_folder(tokenizer)
    return tokenizer


def _forget_source_folder(tokenizer: PreTrainedTokenizerBase) -> None:
    """Drop what from_pretrained remembers about the temporary source folder.

    The folder is deleted right after loading, so its path and the loader
    flags (is_local, local_files_only) are stale; some of them would otherwise
    be written into the saved tokenizer_config.json.
    """
    tokenizer.name_or_path = ""
    for loader_key in ("name_or_path", "is_local", "local_files_only", "vocab_file", "merges_file"):
        tokenizer.init_kwargs.pop(loader_key, None)


# --- Models -----------------------------------------------------------------


def _build_clip_text_model() -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(**_CLIP_TEXT_CONFIG))


def _build_clip_text_model_with_projection() -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(CLIPTextConfig(**_CLIP_TEXT_CONFIG))


def _build_t5_encoder(d_model: int) -> T5EncoderModel:
    return T5EncoderModel(T5Config(**{**_T5_CONFIG, "d_model": d_model}))


def _build_vae(**overrides: Any) -> AutoencoderKL:
    vae: AutoencoderKL = AutoencoderKL(**{**_VAE_CONFIG, **overrides})
    return vae


def _build_sd15() -> DiffusionPipeline:
    return StableDiffusionPipeline(
        vae=_build_vae(scaling_factor=0.18215),
        text_encoder=_build_clip_text_model(),
        tokenizer=_build_clip_tokenizer(),
        unet=UNet2DConditionModel(**_SD15_UNET_CONFIG),
        scheduler=PNDMScheduler(**_SD15_PNDM_CONFIG),
        # diffusers annotates both as required, but None is its documented way
        # to leave them out (a real safety checker is a full CLIP vision model).
        safety_checker=None,  # type: ignore[arg-type]
        feature_extractor=None,  # type: ignore[arg-type]
        requires_safety_checker=False,
    )


def _build_sdxl() -> DiffusionPipeline:
    return StableDiffusionXLPipeline(
        vae=_build_vae(scaling_factor=0.13025),
        text_encoder=_build_clip_text_model(),
        text_encoder_2=_build_clip_text_model_with_projection(),
        tokenizer=_build_clip_tokenizer(),
        tokenizer_2=_build_clip_tokenizer(),
        unet=UNet2DConditionModel(**_SDXL_UNET_CONFIG),
        scheduler=EulerDiscreteScheduler(**_SDXL_EULER_CONFIG),
        # The watermark is a property of the real checkpoint's outputs, not of
        # the architecture, and its package is optional.
        add_watermarker=False,
    )


def _build_sd3() -> DiffusionPipeline:
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**_SD3_TRANSFORMER_CONFIG),
        scheduler=FlowMatchEulerDiscreteScheduler(**_SD3_FLOW_CONFIG),
        vae=_build_vae(**_FLOW_VAE_OVERRIDES, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=_build_clip_text_model_with_projection(),
        tokenizer=_build_clip_tokenizer(),
        text_encoder_2=_build_clip_text_model_with_projection(),
        tokenizer_2=_build_clip_tokenizer(),
        text_encoder_3=_build_t5_encoder(d_model=_SD3_T5_D_MODEL),
        tokenizer_3=_build_t5_tokenizer(),
    )


def _build_flux() -> DiffusionPipeline:
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**_FLUX_FLOW_CONFIG),
        vae=_build_vae(**_FLOW_VAE_OVERRIDES, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=_build_clip_text_model(),
        tokenizer=_build_clip_tokenizer(),
        text_encoder_2=_build_t5_encoder(d_model=_T5_CONFIG["d_model"]),
        tokenizer_2=_build_t5_tokenizer(),
        transformer=FluxTransformer2DModel(**_FLUX_TRANSFORMER_CONFIG),
    )


_PIPELINE_BUILDERS = {
    "sd15": _build_sd15,
    "sdxl": _build_sdxl,
    "sd3": _build_sd3,
    "flux": _build_flux,
}
assert tuple(_PIPELINE_BUILDERS) == TINY_FAMILIES


@contextlib.contextmanager
def _deterministic_fp32_construction() -> Iterator[None]:
    """Seed weight initialisation without disturbing the caller's torch state.

    The global RNG is forked so that building a pipeline does not shift the
    random stream of whoever calls us, and the default dtype is pinned to fp32
    in case the caller changed it.
    """
    previous_default_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_BUILD_SEED)
        torch.set_default_dtype(torch.float32)
        try:
            yield
        finally:
            torch.set_default_dtype(previous_default_dtype)


def build_tiny_pipeline(family: str) -> DiffusionPipeline:
    """Build the tiny random-weight pipeline of ``family`` (one of TINY_FAMILIES).

    Deterministic: weights come from ``torch.manual_seed(0)``, so two builds
    hold identical tensors. Every module is fp32 and in eval mode.
    """
    check_family(family)
    with _deterministic_fp32_construction():
        pipeline = _PIPELINE_BUILDERS[family]()
    for component in pipeline.components.values():
        # Freshly constructed models start in train mode and pipelines never
        # switch them; only from_pretrained returns eval-mode models.
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipeline
