"""The tiny pipelines themselves (imports torch, diffusers and transformers): architectures, tokenizers, weights.

Each pipeline has real component classes and wiring but only three to five million parameters, so tests can
load and run it on a CPU in a fraction of a second. The architectures are built here, seeded; the weights that
``scripts/train-tiny`` trained on the captioned shapes of ``workbench/shapes.py`` are then loaded from
``tiny_weights/<family>.safetensors`` (half precision, parameters only). Nothing is downloaded: tokenizer files
are written by hand into a temporary folder and loaded with ``from_pretrained``, the construction path that
behaves the same on transformers 4.x and 5.x (direct constructor arguments do not).

The configs started from the verified reference in ``shared/docs/tiny-pipelines.md`` and were widened until
the models could learn shapes and colours; the comments below repeat the constraints that tie their numbers
together. Caching and the command line live in :mod:`.tiny`, which does
not import torch, so that finding a cached build costs no heavy import.
"""

from __future__ import annotations

import contextlib
import json
import logging
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

from .tiny import TINY_FAMILIES, TINY_NATIVE_SIZE, check_family

_logger = logging.getLogger(__name__)

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

# The words the tiny models are trained on (workbench/shapes.py's captions) are whole tokens of both tokenizers,
# as a real CLIP or T5 vocabulary has its common words: a two-layer text encoder then learns what "blue" means in
# minutes instead of first having to assemble it from four characters. Other words still tokenize character by
# character. tests/unit/test_shapes.py checks that every caption word is here.
_PROMPT_WORDS = (
    "a", "an", "on", "the", "left", "right", "background",
    "red", "green", "blue", "yellow", "purple", "orange",
    "circle", "square", "triangle", "cross",
    "white", "black", "gray",
)


def _word_merge_chain(word: str) -> list[tuple[str, str]]:
    """The BPE merges that join ``word`` left to right: (b, l), (bl, u), (blu, e</w>) for "blue"."""
    symbols = [*word[:-1], word[-1] + "</w>"]
    merges, joined = [], symbols[0]
    for symbol in symbols[1:]:
        merges.append((joined, symbol))
        joined += symbol
    return merges


# Longer words' merges rank first, so that a pair inside a longer word ("r e" in "green") that starts a shorter
# word's chain cannot break the longer word's chain; test_tiny_pipelines checks each word becomes one token.
_WORD_MERGES = list(dict.fromkeys(
    merge for word in sorted(_PROMPT_WORDS, key=lambda word: (-len(word), word)) for merge in _word_merge_chain(word)
))
_PROMPT_WORD_TOKENS = tuple(dict.fromkeys(left + right for left, right in _WORD_MERGES))

# bos/eos must be the tokenizer's ids: CLIP pools its output at the first
# eos_token_id. With the stock 49407 (absent from our vocab) the pooled
# embedding comes from position 0 and is identical for every prompt, which
# would make SDXL/SD3/FLUX silently ignore the prompt's pooled conditioning.
_CLIP_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": _CLIP_VOCAB_SIZE + len(_PROMPT_WORD_TOKENS),
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": _CLIP_MAX_LENGTH,
    "projection_dim": 64,
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
_T5_VOCAB_SIZE = 4 + 2 * len(_T5_CHARACTERS) + len(_PROMPT_WORDS)

# Dropout 0: the T5 default (0.1) would make a module left in train mode
# nondeterministic; we also .eval() everything, this is belt and braces.
_T5_CONFIG: dict[str, Any] = {
    "vocab_size": _T5_VOCAB_SIZE,
    "d_model": 64,
    "d_kv": 16,
    "d_ff": 128,
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
# SD3 pads the CLIP states (2 * 64 wide) to the T5 width; a narrower T5 would
# silently crop them, so SD3's T5 is 128 wide.
_SD3_T5_D_MODEL = 2 * _CLIP_TEXT_CONFIG["hidden_size"]

# The tiny models are trained on 128x128 images (TINY_NATIVE_SIZE). Four blocks give the usual 8x latent
# downscale, so they denoise 16x16 latents: large enough for a shape's outline, small enough to train on two
# CPU cores. The first block is narrow because it runs at full resolution. norm_num_groups must divide every
# channel count (the default 32 does not).
_VAE_DOWNSCALE = 8
_NATIVE_LATENT_SIDE = TINY_NATIVE_SIZE // _VAE_DOWNSCALE
_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (16, 32, 64, 64),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": TINY_NATIVE_SIZE,
    "latent_channels": 4,
}
# The SD3 and FLUX VAEs have 16 latent channels and no quant convolutions.
_FLOW_VAE_OVERRIDES: dict[str, Any] = {
    "latent_channels": 16,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}

# Both UNets share the layout: three levels (16, 8 and 4 latent pixels), cross-attention on the lower two.
_UNET_LAYOUT: dict[str, Any] = {
    "sample_size": _NATIVE_LATENT_SIDE,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (48, 96, 96),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 16,
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
    "attention_head_dim": (2, 4, 4),
    "use_linear_projection": True,
    "transformer_layers_per_block": (1, 1, 1),
    # The two CLIP encoders' hidden states are concatenated.
    "cross_attention_dim": 2 * _CLIP_TEXT_CONFIG["hidden_size"],
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": _SDXL_ADDITION_TIME_EMBED_DIM,
    # Six size/crop ids, each embedded, plus the second encoder's projection.
    "projection_class_embeddings_input_dim": 6 * _SDXL_ADDITION_TIME_EMBED_DIM
    + _CLIP_TEXT_CONFIG["projection_dim"],
}

_SD3_TRANSFORMER_CONFIG: dict[str, Any] = {
    # Not the native side (the model config says 128 px) but the scale of the sine-cosine position table: patch
    # positions step by (sample_size / patch_size) / pos_embed_max_size, 1/3 here as in the real SD3
    # (64 / 192). With the native 16 they stepped by 1/12, and every patch's position looked alike to the
    # model: trained so, it drew scattered blobs in place of one shape.
    "sample_size": 64,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 4,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    # Must equal num_attention_heads * attention_head_dim.
    "caption_projection_dim": 128,
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
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    # Must equal the T5 width.
    "joint_attention_dim": _T5_CONFIG["d_model"],
    # FLUX pools only CLIPTextModel's pooler output (hidden_size wide).
    "pooled_projection_dim": _CLIP_TEXT_CONFIG["hidden_size"],
    # Mirrors FLUX.1-schnell, which (unlike FLUX.1-dev) has no guidance
    # embedding: guidance_scale has no effect on it.
    "guidance_embeds": False,
    # Must sum to attention_head_dim.
    "axes_dims_rope": (8, 12, 12),
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
# FLUX.1-schnell's scheduler (static schedule; FLUX.1-dev shifts by resolution instead) except for the shift:
# schnell's is 1.0, which suits a model distilled to draw in 4 steps. The tiny FLUX is not distilled; trained and
# sampled with SD3's static shift of 3, which spends more of its training and of the 4 steps at high noise, where
# a shape's outline is decided, it drew 81.6 % of held-out shapes, against 60.5 % unshifted (the same 60-minute
# recipe, with a VAE of its own; docs/models.md).
_FLUX_FLOW_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
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
    """Every byte, alone and word-final, then bos and eos, then the prompt words and their partial merges."""
    byte_symbols = _gpt2_byte_symbols()
    vocabulary = {symbol: index for index, symbol in enumerate(byte_symbols)}
    vocabulary.update({symbol + "</w>": 256 + index for index, symbol in enumerate(byte_symbols)})
    vocabulary[_CLIP_START_OF_TEXT] = _CLIP_BOS_ID
    vocabulary[_CLIP_END_OF_TEXT] = _CLIP_EOS_ID
    assert len(vocabulary) == _CLIP_VOCAB_SIZE
    vocabulary.update({token: _CLIP_VOCAB_SIZE + index for index, token in enumerate(_PROMPT_WORD_TOKENS)})
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
        # Only the prompt words' merges: every other word tokenizes character by character.
        merges = "".join(f"{left} {right}\n" for left, right in _WORD_MERGES)
        (folder / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")
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
    # A whole word scores far above its letters (-3 - 3.5 per further letter), so the unigram model takes it.
    pieces.extend(("▁" + word, -1.0, piece_type.NORMAL) for word in _PROMPT_WORDS)
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


def build_tiny_pipeline(family: str, *, trained: bool = True) -> DiffusionPipeline:
    """Build the tiny pipeline of ``family`` (one of TINY_FAMILIES).

    ``trained``: load the weights trained by ``scripts/train-tiny`` (``TRAINED_WEIGHTS/<family>.safetensors``)
    when the repository has them; otherwise, and always with ``trained=False``, the weights are random.
    Deterministic either way: random weights come from ``torch.manual_seed(0)``, so two builds hold identical
    tensors. Every module is fp32 and in eval mode.
    """
    check_family(family)
    with _deterministic_fp32_construction():
        pipeline = _PIPELINE_BUILDERS[family]()
    for component in pipeline.components.values():
        # Freshly constructed models start in train mode and pipelines never
        # switch them; only from_pretrained returns eval-mode models.
        if isinstance(component, torch.nn.Module):
            component.eval()
    weights = trained_weights_file(family)
    if trained:
        if weights.is_file():
            load_tiny_weights(pipeline, weights)
        else:
            _logger.warning("no trained weights for the tiny %s at %s: its weights are random "
                            "(scripts/train-tiny %s --install trains them)", family, weights, family)
    return pipeline


# --- Trained weights ----------------------------------------------------------

TRAINED_WEIGHTS = pathlib.Path(__file__).parent / "tiny_weights"
# The same folder as the (torch-free) cache fingerprint reads.
"""Where ``scripts/train-tiny --install`` puts each family's trained weights, one file per family."""

# Metadata keys of a weights file: the VAE's latent factors are set from the trained VAE's latents, so they
# travel with its weights.
_VAE_FACTORS = ("scaling_factor", "shift_factor")


def trained_weights_file(family: str) -> pathlib.Path:
    return TRAINED_WEIGHTS / f"{family}.safetensors"


def save_tiny_weights(pipeline: DiffusionPipeline, path: pathlib.Path, metadata: dict[str, str]) -> None:
    """Write every component's parameters in half precision, keyed ``component.parameter``, to ``path``.

    Parameters only: buffers (SD3's sine-cosine position table, CLIP's position ids) are rebuilt by the
    constructors, and leaving them out keeps the repository's files small.
    """
    from safetensors.torch import save_file

    tensors = {
        f"{name}.{key}": parameter.detach().to(torch.float16).contiguous()
        for name, component in pipeline.components.items()
        if isinstance(component, torch.nn.Module)
        for key, parameter in component.named_parameters()
    }
    vae_config = pipeline.vae.config
    factors = {f"vae.{factor}": str(vae_config[factor]) for factor in _VAE_FACTORS
               if vae_config.get(factor) is not None}
    save_file(tensors, str(path), metadata={**metadata, **factors})


def load_tiny_weights(
    pipeline: DiffusionPipeline, path: pathlib.Path, components: tuple[str, ...] | None = None
) -> None:
    """Load ``save_tiny_weights``' file into ``pipeline`` (all components, or only ``components``), in fp32.

    Refuses a file that does not fit: a missing or unexpected parameter means the file was trained for another
    architecture, and loading it partially would serve noise that looks like a model.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as weights:
        metadata = weights.metadata() or {}
        keys = set(weights.keys())
        for name, component in pipeline.components.items():
            if not isinstance(component, torch.nn.Module) or (components is not None and name not in components):
                continue
            prefix = f"{name}."
            state = {key[len(prefix):]: weights.get_tensor(key).to(torch.float32)
                     for key in keys if key.startswith(prefix)}
            expected = {key for key, _ in component.named_parameters()}
            if set(state) != expected:
                missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
                raise ValueError(f"{path} does not fit the tiny {name}: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}; retrain it with scripts/train-tiny")
            component.load_state_dict(state, strict=False)
    if components is None or "vae" in components:
        factors = {factor: float(metadata[f"vae.{factor}"]) for factor in _VAE_FACTORS
                   if f"vae.{factor}" in metadata}
        pipeline.vae.register_to_config(**factors)
