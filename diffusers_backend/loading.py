"""Find a pipeline's weights (a local folder or the Hugging Face hub) and load them onto the right device.

The hub is reached through ``huggingface_hub``, which honours ``HF_TOKEN`` (gated models such as SD3 and FLUX
need one), ``HF_HOME`` (where downloads are cached) and ``HF_HUB_OFFLINE=1`` (use only what is cached). Any
failure becomes a :class:`ModelLoadError` that names the model and says what to do.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ModelLoadError
from .families import PipelineTraits, inspect_pipeline
from .settings import ModelSettings

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    """Where one Triton model instance runs: from ``model_instance_kind`` and ``model_instance_device_id``."""

    kind: str
    device_id: int = 0

    @property
    def on_gpu(self) -> bool:
        return self.kind.upper() in {"GPU", "KIND_GPU"}

    @property
    def torch_device(self) -> str:
        return f"cuda:{self.device_id}" if self.on_gpu else "cpu"


def looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~"))


def resolve_pipeline_folder(settings: ModelSettings, model_directory: Path | None = None) -> Path:
    """The local folder holding the pipeline: the configured one, or a hub snapshot fetched into HF_HOME."""
    source = settings.source
    if looks_like_path(source) or (model_directory is not None and (model_directory / source).is_dir()):
        base = model_directory if model_directory is not None else Path.cwd()
        folder = (base / Path(source).expanduser()).resolve()
        if not (folder / "model_index.json").is_file():
            raise ModelLoadError(
                f"model {settings.model_id!r}: model_source {source!r} resolves to {folder}, which holds no "
                "model_index.json; point model_source at a diffusers pipeline folder (save_pretrained output)"
            )
        return folder
    return _download_from_hub(settings)


def _download_from_hub(settings: ModelSettings) -> Path:
    from diffusers import DiffusionPipeline
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo_id = settings.source
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    advice = (
        f"fetch it once where the hub is reachable (`hf download {repo_id}` with the same HF_HOME), "
        "or set model_source in config.pbtxt to a local pipeline folder"
    )
    try:
        # DiffusionPipeline.download fetches only what from_pretrained will read (safetensors, the variant).
        folder = DiffusionPipeline.download(
            repo_id, revision=settings.revision, variant=settings.variant, use_safetensors=True,
            local_files_only=offline,
        )
    except GatedRepoError as error:
        raise ModelLoadError(
            f"model {settings.model_id!r}: {repo_id} is gated on the hub; accept its licence on the model's "
            f"hub page and set HF_TOKEN to a token of that account ({error.__class__.__name__})"
        ) from error
    except RepositoryNotFoundError as error:
        raise ModelLoadError(
            f"model {settings.model_id!r}: hub repository {repo_id!r} does not exist or needs HF_TOKEN; "
            "check model_source/model_id in config.pbtxt"
        ) from error
    except LocalEntryNotFoundError as error:
        where = "HF_HUB_OFFLINE is set and it is not in the cache" if offline else "the hub cannot be reached"
        raise ModelLoadError(
            f"model {settings.model_id!r}: weights of {repo_id} cannot be had: {where} "
            f"(HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}); {advice}"
        ) from error
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"model {settings.model_id!r}: fetching {repo_id} failed: {error}; {advice}") from error
    return Path(folder)


class TruncatedPromptFilter(logging.Filter):
    """diffusers logs the part of a prompt it truncates, verbatim, at WARNING: keep the fact, drop the text."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "your input was truncated" in message:
            record.msg = message.split(" tokens:")[0] + " tokens (the prompt text is not logged)"
            record.args = ()
        return True


def quiet_library_logging() -> None:
    """No prompt text and no progress bars from diffusers and transformers in a server's log."""
    import diffusers.utils.logging
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    # diffusers writes through a handler of its own and does not propagate to the root logger.
    diffusers.utils.logging.get_logger("diffusers")  # creates that handler if there is none yet
    for handler in logging.getLogger("diffusers").handlers:
        if not any(isinstance(existing, TruncatedPromptFilter) for existing in handler.filters):
            handler.addFilter(TruncatedPromptFilter())


def torch_dtype(name: str) -> torch.dtype:
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ModelLoadError(f"{name!r} is not a torch dtype")
    return dtype


def locate_pipeline(settings: ModelSettings, model_directory: Path | None = None) -> tuple[Path, PipelineTraits]:
    """The pipeline's local folder (fetched if need be) and its traits, before any weight is loaded."""
    folder = resolve_pipeline_folder(settings, model_directory)
    return folder, inspect_pipeline(folder)


def load_pipeline(settings: ModelSettings, placement: Placement, folder: Path, traits: PipelineTraits) -> Any:
    """Load the pipeline saved in ``folder`` onto ``placement``'s device."""
    import diffusers
    import torch

    if placement.on_gpu and not torch.cuda.is_available():
        raise ModelLoadError(
            f"model {settings.model_id!r}: instance kind GPU, but torch sees no CUDA device; use "
            "instance_group { kind: KIND_CPU } or run on a GPU machine"
        )
    dtype = torch_dtype(settings.torch_dtype_name(placement.on_gpu))
    if not placement.on_gpu and settings.cpu_threads is not None:
        torch.set_num_threads(settings.cpu_threads)  # each Triton instance is a process of its own
    pipeline_class = getattr(diffusers, traits.family.pipeline_class)
    logger.info(
        "loading %s (%s) from %s as %s on %s",
        settings.model_id, traits.family.name, folder, dtype, placement.torch_device,
    )
    quiet_library_logging()
    try:
        pipeline = pipeline_class.from_pretrained(folder, dtype=dtype, variant=settings.variant)
        pipeline.to(placement.torch_device)
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelLoadError(
            f"model {settings.model_id!r}: loading {traits.family.pipeline_class} from {folder} failed: {error}"
        ) from error
    pipeline.set_progress_bar_config(disable=True)
    apply_speed_settings(pipeline, traits, settings)
    return pipeline


def apply_speed_settings(pipeline: Any, traits: PipelineTraits, settings: ModelSettings) -> None:
    """channels_last, attention_backend and torch_compile, in that order (compile sees the final module)."""
    import torch

    denoiser_name = traits.family.denoiser
    denoiser = getattr(pipeline, denoiser_name)
    if settings.channels_last and denoiser_name == "unet":
        denoiser.to(memory_format=torch.channels_last)
        pipeline.vae.to(memory_format=torch.channels_last)
    if settings.attention_backend is not None:
        try:
            denoiser.set_attention_backend(settings.attention_backend)
        except (ValueError, RuntimeError, ImportError) as error:
            raise ModelLoadError(
                f"model {settings.model_id!r}: parameter attention_backend={settings.attention_backend!r} "
                f"cannot be used: {error}"
            ) from error
    if settings.torch_compile is not None:
        setattr(pipeline, denoiser_name, torch.compile(denoiser, mode=settings.torch_compile))
