"""``scripts/add_model SOURCE``: write the Triton model folder that serves a diffusers text-to-image pipeline.

SOURCE is a local pipeline folder (``save_pretrained`` output) or a Hugging Face hub id. The family comes from
the pipeline's ``model_index.json`` (``_class_name``, see diffusers_backend/families.py); the written
``config.pbtxt`` is that family's ``model_repository/<family>/config.pbtxt`` (tensor contract, batching, queue
policy, dtypes) with its name, weights and defaults changed, and ``1/model.py`` is the family's, byte for byte.
From the hub only ``model_index.json`` and the scheduler's config are read (the cache first when
``HF_HUB_OFFLINE=1``), never weights: the server fetches those when it loads the model.

Variants:

- **turbo-style** (adversarially distilled: sdxl-turbo, sd-turbo, SD 3.5 large turbo): the defaults become
  one step (SD3: four) at guidance 0. Detected when the last part of SOURCE contains the word ``turbo``, or when
  the scheduler is ``EulerAncestralDiscreteScheduler`` with ``timestep_spacing: trailing``, as sdxl-turbo
  ships; ``--turbo``/``--no-turbo`` override the detection, ``--steps``/``--guidance-scale`` the defaults.
- **v-prediction** (SD 2.x 768): nothing to write. The scheduler reads ``prediction_type`` from its own config
  and the native size comes from the UNet's ``sample_size`` when the model loads.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from diffusers_backend.errors import ModelConfigError, ModelLoadError
from diffusers_backend.families import FAMILY_BY_PIPELINE_CLASS, Family, detect_family
from diffusers_backend.loading import hub_offline, looks_like_path
from diffusers_backend.settings import ModelSettings

from .errors import LauncherError
from .paths import MODEL_REPOSITORY
from .repository import (
    STREAM_SUFFIX,
    read_parameters,
    streaming_config,
    with_cpu_instances,
    with_parameters,
    write_if_changed,
)


class AddModelError(LauncherError):
    """The model folder cannot be written: the message says why and what to do."""


MAX_NAME_LENGTH = 100
_VALID_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
NAME_RULE = (f"Triton serves a model under its folder name, in URLs (/v2/models/NAME): use letters, digits, '.', "
             f"'_' and '-', starting with a letter or digit, at most {MAX_NAME_LENGTH} characters")

TURBO_DEFAULTS: dict[str, tuple[int, float]] = {"sd15": (1, 0.0), "sdxl": (1, 0.0), "sd3": (4, 0.0)}
"""(steps, guidance) published with the turbo models: sd-turbo and sdxl-turbo 1 step, SD 3.5 large turbo 4,
all without classifier-free guidance. FLUX has no turbo: schnell is recognised when the model loads."""
_TURBO_WORD = re.compile(r"(?:^|[^a-z0-9])turbo(?:[^a-z0-9]|$)")
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"


@dataclass(frozen=True)
class InstanceGroup:
    kind: str
    """``cpu`` or ``gpu``."""
    count: int

    @classmethod
    def parse(cls, text: str) -> InstanceGroup:
        kind, _, count = text.partition(":")
        if kind not in ("cpu", "gpu") or not count.isdigit() or int(count) < 1:
            raise argparse.ArgumentTypeError(f"{text!r} is invalid: must be cpu:N or gpu:N with N >= 1")
        return cls(kind, int(count))

    def apply(self, config_text: str) -> str:
        if self.kind == "cpu":
            return with_cpu_instances(config_text, self.count)
        group = f"instance_group [ {{ kind: KIND_GPU count: {self.count} }} ]"
        return re.sub(r"^instance_group \[.*\]$", group, config_text, count=1, flags=re.MULTILINE)


@dataclass(frozen=True)
class AddModelOptions:
    source: str
    name: str | None = None
    """Triton model name; None: from the last part of ``source``."""
    repository: Path = MODEL_REPOSITORY
    streaming: bool = False
    """Also write ``<name>-stream``, the decoupled variant that sends progress after every step."""
    instances: InstanceGroup | None = None
    """None: the family's (one GPU instance)."""
    model_id: str | None = None
    """None: the hub id, or ``name`` for a local folder."""
    revision: str | None = None
    variant: str | None = None
    turbo: bool | None = None
    """None: detect (see the module's docstring)."""
    default_steps: int | None = None
    default_guidance_scale: float | None = None
    force: bool = False


@dataclass(frozen=True)
class PipelineDescription:
    """What add_model learnt about SOURCE: where its small JSON files are, and what they say."""

    folder: Path
    """Local folder holding ``model_index.json`` (for a hub id, the cached snapshot)."""
    hub_id: str | None
    family: Family
    scheduler: dict[str, object] = field(default_factory=dict)

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler.get("prediction_type", "epsilon"))


@dataclass(frozen=True)
class AddedModel:
    name: str
    family: Family
    folders: tuple[Path, ...]
    parameters: dict[str, str]
    turbo_reason: str | None
    prediction_type: str


def describe_pipeline(source: str, revision: str | None = None) -> PipelineDescription:
    """Find SOURCE's ``model_index.json`` (local folder or hub) and detect its family."""
    local = Path(source).expanduser()
    if local.is_dir():
        if revision is not None:
            raise AddModelError(f"--revision {revision} applies to hub ids only; {source} is a local folder")
        if not (local / "model_index.json").is_file():
            raise AddModelError(
                f"{source} is not a diffusers pipeline folder: it holds no model_index.json (expected the output "
                "of DiffusionPipeline.save_pretrained, or a hub snapshot)"
            )
        folder, hub_id = local.resolve(), None
    elif local.exists():
        raise AddModelError(f"{source} is not a diffusers pipeline folder: it is a file")
    elif looks_like_path(source):
        raise AddModelError(f"{source} is not a diffusers pipeline folder: no such directory")
    else:
        folder, hub_id = _fetch_index_from_hub(source, revision), source
    try:
        family = detect_family(folder)
    except ModelLoadError as error:
        raise AddModelError(f"{source}: {error}") from error
    scheduler_path = folder / SCHEDULER_CONFIG
    scheduler: dict[str, object] = {}
    if scheduler_path.is_file():
        try:
            loaded = json.loads(scheduler_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise AddModelError(f"{source}: {SCHEDULER_CONFIG} cannot be read as JSON ({error}): the pipeline "
                                "folder is damaged; fetch or save it again") from error
        scheduler = loaded if isinstance(loaded, dict) else {}
    return PipelineDescription(folder, hub_id, family, scheduler)


def _fetch_index_from_hub(repo_id: str, revision: str | None) -> Path:
    """The snapshot folder holding ``repo_id``'s ``model_index.json`` (and scheduler config, when it has one)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = hub_offline()
    at_revision = f" at revision {revision}" if revision else ""
    try:
        index = Path(hf_hub_download(repo_id, "model_index.json", revision=revision, local_files_only=offline))
    except HFValidationError:
        raise AddModelError(
            f"{repo_id!r} is neither an existing folder nor a hub repository id (namespace/name)"
        ) from None
    except GatedRepoError:
        raise AddModelError(
            f"{repo_id} is gated on the hub: accept its licence on https://huggingface.co/{repo_id} and set "
            "HF_TOKEN to a read token of that account (the server needs it too, to fetch the weights)"
        ) from None
    except RepositoryNotFoundError:
        raise AddModelError(
            f"hub repository {repo_id!r} does not exist, or is private (set HF_TOKEN); a local folder must exist "
            "and hold model_index.json"
        ) from None
    except RevisionNotFoundError:
        raise AddModelError(f"revision {revision!r} does not exist in hub repository {repo_id}: fix --revision") \
            from None
    except LocalEntryNotFoundError:
        where = ("HF_HUB_OFFLINE is set and it is not in the cache" if offline else
                 "the hub cannot be reached and it is not in the cache (HF_HUB_OFFLINE=1 skips the retries)")
        raise AddModelError(
            f"model_index.json of {repo_id}{at_revision} cannot be read: {where}; run add_model where the hub is "
            f"reachable (`hf download {repo_id}` fills the cache), or pass a local pipeline folder"
        ) from None
    except EntryNotFoundError:
        raise AddModelError(
            f"hub repository {repo_id}{at_revision} has no model_index.json: it is not a diffusers pipeline"
        ) from None
    except OSError as error:
        raise AddModelError(f"model_index.json of {repo_id}{at_revision} cannot be read: {error}") from error
    # It lands next to model_index.json in the same snapshot folder; without it turbo detection rests on the
    # name alone.
    with contextlib.suppress(EntryNotFoundError, OSError):
        hf_hub_download(repo_id, "scheduler_config.json", subfolder="scheduler", revision=revision,
                        local_files_only=offline)
    return index.parent


def turbo_reason(source: str, description: PipelineDescription) -> str | None:
    """Why SOURCE looks like a turbo model, or None (see the module's docstring for the rule)."""
    if description.family.name not in TURBO_DEFAULTS:
        return None
    last_part = source.rstrip("/").rsplit("/", 1)[-1].lower()
    if _TURBO_WORD.search(last_part):
        return f"its name {last_part!r} says turbo"
    scheduler = description.scheduler
    if scheduler.get("_class_name") == "EulerAncestralDiscreteScheduler" and \
            scheduler.get("timestep_spacing") == "trailing":
        return "its scheduler is EulerAncestralDiscreteScheduler with trailing timesteps, as sdxl-turbo ships"
    return None


def default_name(source: str) -> str:
    last_part = source.rstrip("/").rsplit("/", 1)[-1].lower()
    return re.sub(r"[^a-z0-9_.-]+", "-", last_part).lstrip("-._")[:MAX_NAME_LENGTH]


def check_name(name: str) -> None:
    if not _VALID_NAME.match(name) or len(name) > MAX_NAME_LENGTH:
        raise AddModelError(f"model name {name!r} is invalid: {NAME_RULE}")


def model_config(family_config: str, options: AddModelOptions, name: str, header: str,
                 parameters: dict[str, str | None]) -> str:
    """The family's config with the name, instance group and parameters changed, under ``header``."""
    family_name = re.search(r'^name: "([^"]+)"$', family_config, flags=re.MULTILINE)
    if family_name is None:
        raise AddModelError("the family's config.pbtxt has no name line")
    # The family's leading comments describe its own weights; the header replaces them.
    text = family_config[family_name.start():].replace(family_name[0], f'name: "{name}"', 1)
    if options.instances is not None:
        text = options.instances.apply(text)
    return header + with_parameters(text, parameters)


def add_model(options: AddModelOptions) -> AddedModel:
    description = describe_pipeline(options.source, options.revision)
    family = description.family
    name = options.name if options.name is not None else default_name(options.source)
    if not name:
        raise AddModelError(f"no model name can be made from {options.source!r}: pass --name")
    check_name(name)
    names = [name, name + STREAM_SUFFIX] if options.streaming else [name]
    for each in names:
        check_name(each)
        if (options.repository / each).exists() and not options.force:
            raise AddModelError(
                f"{options.repository / each} exists: pass --force to overwrite its config.pbtxt and 1/model.py "
                "(nothing else in it is touched), or choose another --name"
            )

    reason = turbo_reason(options.source, description) if options.turbo is None else \
        ("--turbo" if options.turbo else None)
    if reason is not None and family.name not in TURBO_DEFAULTS:
        raise AddModelError(f"--turbo has no meaning for {family.name} models: {sorted(TURBO_DEFAULTS)} only")
    steps, guidance = TURBO_DEFAULTS[family.name] if reason is not None else (None, None)
    steps = options.default_steps if options.default_steps is not None else steps
    guidance = options.default_guidance_scale if options.default_guidance_scale is not None else guidance

    model_directory = options.repository / name
    if description.hub_id is not None:
        model_id = options.model_id or description.hub_id
        model_source = description.hub_id if model_id != description.hub_id else None
    else:
        model_id = options.model_id or name
        model_source = _local_source(description.folder, model_directory.resolve())
    parameters: dict[str, str | None] = {
        "model_id": model_id,
        "model_source": model_source,
        "revision": options.revision,
        # A variant names files of one repository, not of the family: only when asked for.
        "variant": options.variant,
        "default_steps": None if steps is None else str(steps),
        "default_guidance_scale": None if guidance is None else _number_text(guidance),
    }

    family_folder = MODEL_REPOSITORY / family.name
    family_config = (family_folder / "config.pbtxt").read_text(encoding="utf-8")
    header = _header(options, description, reason, model_source or model_id)
    config = model_config(family_config, options, name, header, parameters)
    written = read_parameters(config)
    try:
        ModelSettings.from_parameters({key: {"string_value": value} for key, value in written.items()})
    except ModelConfigError as error:
        raise AddModelError(f"the config for {name} would not load: {error}") from error

    model_py = (family_folder / "1" / "model.py").read_bytes()
    folders = [model_directory]
    write_if_changed(model_directory / "config.pbtxt", config.encode("utf-8"))
    write_if_changed(model_directory / "1" / "model.py", model_py)
    if options.streaming:
        stream_directory = options.repository / (name + STREAM_SUFFIX)
        write_if_changed(stream_directory / "config.pbtxt", streaming_config(config).encode("utf-8"))
        write_if_changed(stream_directory / "1" / "model.py", model_py)
        folders.append(stream_directory)
    return AddedModel(name, family, tuple(folders), written, reason, description.prediction_type)


def _local_source(folder: Path, model_directory: Path) -> str:
    """``model_source`` for a local pipeline: relative to the model's folder when both lie in one tree (a
    repository moved together with its weights still loads), else absolute."""
    if os.path.commonpath([folder, model_directory]) == folder.anchor:
        return str(folder)
    relative = os.path.relpath(folder, model_directory)
    # "./" or "../" marks it as a path even before the folder exists (settings.py would take a hub id).
    return relative if relative.startswith("../") else "./" + relative


def _number_text(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


def _header(options: AddModelOptions, description: PipelineDescription, reason: str | None, source: str) -> str:
    family = description.family
    at_revision = f" at revision {options.revision}" if options.revision else ""
    lines = [
        f"# Written by scripts/add_model from {source}{at_revision}: a {family.pipeline_class}, configured like",
        f"# model_repository/{family.name}/config.pbtxt (batching, queue policy, dtypes).",
    ]
    if reason is not None:
        steps, guidance = TURBO_DEFAULTS[family.name]
        lines.append(f"# Turbo-style defaults ({steps} step{'s' if steps > 1 else ''}, guidance "
                     f"{_number_text(guidance)}): {reason}.")
    if description.prediction_type == "v_prediction":
        lines.append("# v-prediction: its scheduler config says so; nothing to set here.")
    lines += [
        '# The tensor contract is the same for every model: see docs/contract.md.',
        "# Parameters are parsed by diffusers_backend/settings.py, which lists every key with its rule.",
    ]
    return "\n".join(lines) + "\n"


def _guidance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: must be a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: must be a finite number >= 0")
    return value


def _steps(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: must be a positive integer")
    return int(text)


def parse_arguments(argv: list[str] | None = None) -> AddModelOptions:
    supported = ", ".join(f"{family.pipeline_class} ({family.name})" for family in FAMILY_BY_PIPELINE_CLASS.values())
    parser = argparse.ArgumentParser(
        prog="scripts/add_model", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Supported pipeline classes: {supported}.",
    )
    parser.add_argument("source", metavar="SOURCE", help="local diffusers pipeline folder, or hub id (org/name)")
    parser.add_argument("--name", help="Triton model name (default: from SOURCE's last part)")
    parser.add_argument("--repository", type=Path, default=MODEL_REPOSITORY,
                        help="model repository to write into (default: model_repository/)")
    parser.add_argument("--streaming", action="store_true", help="also write NAME-stream, the progress variant")
    parser.add_argument("--instances", type=InstanceGroup.parse, metavar="KIND:N",
                        help="cpu:N or gpu:N instances (default: the family's, one GPU instance)")
    parser.add_argument("--model-id", help="id clients use (default: the hub id, or NAME for a local folder)")
    parser.add_argument("--revision", help="hub branch, tag or commit to pin (read and served)")
    parser.add_argument("--variant", help="weight variant the hub repository has, e.g. fp16 (half the download)")
    turbo = parser.add_mutually_exclusive_group()
    turbo.add_argument("--turbo", dest="turbo", action="store_true", default=None,
                       help="turbo-style defaults whatever the detection says")
    turbo.add_argument("--no-turbo", dest="turbo", action="store_false", help="never turbo-style defaults")
    parser.add_argument("--steps", type=_steps, dest="default_steps", help="default_steps to write")
    parser.add_argument("--guidance-scale", type=_guidance, dest="default_guidance_scale",
                        help="default_guidance_scale to write")
    parser.add_argument("--force", action="store_true", help="overwrite an existing model folder's two files")
    return AddModelOptions(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    options = parse_arguments(argv)
    try:
        added = add_model(options)
    except AddModelError as error:
        print(f"add_model: {error}", file=sys.stderr)
        return 1
    notes = [added.family.name]
    if added.turbo_reason is not None:
        notes.append(f"turbo-style defaults: {added.turbo_reason}")
    if added.prediction_type == "v_prediction":
        notes.append("v-prediction")
    for folder in added.folders:
        print(f"wrote {folder} ({'; '.join(notes)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
