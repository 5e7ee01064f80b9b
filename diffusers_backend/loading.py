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


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for the cache only (read now: tests and restarts may change it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _download_from_hub(settings: ModelSettings) -> Path:
    from diffusers import DiffusionPipeline

    offline = hub_offline()
    try:
        # DiffusionPipeline.download fetches only what from_pretrained will read (safetensors, the variant) at
        # the pinned revision; the folder it returns is that revision's snapshot.
        folder = DiffusionPipeline.download(
            settings.source, revision=settings.revision, variant=settings.variant, use_safetensors=True,
            local_files_only=offline,
        )
    except (OSError, ValueError) as error:
        raise explain_hub_failure(settings, error, offline) from error
    return Path(folder)


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and every exception it was raised from or while handling, nearest first."""
    found: list[BaseException] = []
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop(0)
        if current is None or any(current is seen for seen in found):
            continue
        found.append(current)
        pending += [current.__cause__, current.__context__]
    return found


def explain_hub_failure(settings: ModelSettings, error: BaseException, offline: bool) -> ModelLoadError:
    """What went wrong fetching ``settings``' weights from the hub, naming the model and the fix.

    diffusers catches the hub's own errors and raises an ``OSError`` from them when the cache cannot stand in
    (a gated or missing repository, a wrong revision), so the cause is looked for along the whole chain.
    """
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id = settings.source
    model = f"model {settings.model_id!r}"
    page = f"https://huggingface.co/{repo_id}"
    has_token = get_token() is not None
    token_state = "a token is set (HF_TOKEN or `hf auth login`)" if has_token else "no token is set (HF_TOKEN)"
    chain = _chain(error)

    def first(*kinds: type[BaseException]) -> BaseException | None:
        return next((cause for cause in chain if isinstance(cause, kinds)), None)

    # Subclasses before their bases: GatedRepoError is a RepositoryNotFoundError.
    if first(GatedRepoError) is not None:
        fix = ("accept its licence on " + page + " with the account of that token" if has_token else
               "accept its licence on " + page + " and set HF_TOKEN to a read token of that account")
        return ModelLoadError(f"{model}: {repo_id} is gated on the hub and {token_state}: {fix}")
    if first(RevisionNotFoundError) is not None:
        return ModelLoadError(
            f"{model}: revision {settings.revision!r} does not exist in hub repository {repo_id}: set parameter "
            f"revision in config.pbtxt to a branch, tag or commit of {page}/commits/main, or remove it for main"
        )
    if first(RepositoryNotFoundError) is not None:
        return ModelLoadError(
            f"{model}: hub repository {repo_id!r} does not exist, or is private and {token_state}: check "
            "model_id/model_source in config.pbtxt (a hub id such as stabilityai/sdxl-turbo, or a local "
            "pipeline folder), or set HF_TOKEN for a private repository"
        )
    if first(HFValidationError) is not None:
        return ModelLoadError(
            f"{model}: {repo_id!r} is neither a local pipeline folder nor a valid hub repository id "
            "(namespace/name): fix model_id/model_source in config.pbtxt"
        )
    advice = (
        f"fetch it once where the hub is reachable (`hf download {repo_id}"
        + (f" --revision {settings.revision}" if settings.revision else "")
        + "` with the same HF_HOME), or set model_source in config.pbtxt to a local pipeline folder"
    )
    at_revision = f" at revision {settings.revision}" if settings.revision else ""
    if first(LocalEntryNotFoundError, OfflineModeIsEnabled, FileNotFoundError) is not None:
        where = "HF_HUB_OFFLINE is set and it is not in the cache" if offline else "the hub cannot be reached"
        return ModelLoadError(
            f"{model}: weights of {repo_id}{at_revision} cannot be had: {where} "
            f"(HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}, cache {constants.HF_HUB_CACHE}); "
            f"{advice}"
        )
    return ModelLoadError(f"{model}: fetching {repo_id}{at_revision} failed: {error}; {advice}")


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
    blank_text_encoders_for_tests(pipeline, settings.model_id)
    return pipeline


TEST_BLANK_TEXT_ENCODERS = "TRITON_DIFFUSERS_TEST_BLANK_TEXT_ENCODERS"
"""Test-only switch: a comma-separated list of pipeline components (``text_encoder_2``, ...) whose outputs are
replaced by zeros, in the server's environment. The prompt-path tests set it to prove that every text encoder of
a family reaches the image: blanking one must make the tiny models draw worse. Never set in production; a model
loaded with it says so in a warning."""


def blank_text_encoders_for_tests(pipeline: Any, model_id: str) -> None:
    names = [name.strip() for name in os.environ.get(TEST_BLANK_TEXT_ENCODERS, "").split(",") if name.strip()]
    for name in names:
        encoder = getattr(pipeline, name, None)
        if encoder is None:
            continue  # a family without this encoder
        logger.warning("model %r: the outputs of its %s are zeros (%s is set: for tests only)",
                       model_id, name, TEST_BLANK_TEXT_ENCODERS)
        encoder.register_forward_hook(lambda _module, _inputs, output: _zeros_like(output))


def _zeros_like(value: Any) -> Any:
    """``value`` (a tensor, or a model output or tuple holding tensors) with every tensor zeroed."""
    import torch

    if isinstance(value, torch.Tensor):
        return torch.zeros_like(value)
    if isinstance(value, tuple):
        return tuple(_zeros_like(item) for item in value)
    if isinstance(value, dict):  # transformers' ModelOutput is an ordered dict of its fields
        return type(value)(**{key: _zeros_like(item) for key, item in value.items()})
    return value


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
