"""Tests for the offline tiny-pipeline builder (diffusers_backend.tiny)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from diffusers_backend import tiny  # noqa: E402

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _file_bytes(folder: pathlib.Path) -> dict[str, bytes]:
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _file_identities(folder: pathlib.Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime in ns) per file: both change if a file is rewritten or replaced."""
    identities = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            status = path.stat()
            identities[path.relative_to(folder).as_posix()] = (status.st_ino, status.st_mtime_ns)
    return identities


def _stamp(folder: pathlib.Path) -> dict[str, object]:
    stamp: dict[str, object] = json.loads((folder / tiny.STAMP_FILE_NAME).read_text())
    return stamp


@pytest.mark.parametrize("family", tiny.TINY_FAMILIES)
def test_save_tiny_pipeline_writes_identical_bytes_when_built_twice(
    family: str, tmp_path: pathlib.Path
) -> None:
    tiny.save_tiny_pipeline(family, tmp_path / "first")
    tiny.save_tiny_pipeline(family, tmp_path / "second")

    first = _file_bytes(tmp_path / "first")
    assert "model_index.json" in first
    assert first == _file_bytes(tmp_path / "second")


def test_save_tiny_pipeline_writes_identical_bytes_when_built_in_another_process(
    tmp_path: pathlib.Path,
) -> None:
    # A fresh interpreter has a different hash seed, RNG state and temp names.
    script = (
        "import pathlib, sys\n"
        "from diffusers_backend import tiny\n"
        "for family in tiny.TINY_FAMILIES:\n"
        "    tiny.save_tiny_pipeline(family, pathlib.Path(sys.argv[1]) / family)\n"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "other-process")],
        cwd=PROJECT_ROOT,
        check=True,
        capture_output=True,
    )
    for family in tiny.TINY_FAMILIES:
        tiny.save_tiny_pipeline(family, tmp_path / "this-process" / family)
        assert _file_bytes(tmp_path / "this-process" / family) == _file_bytes(
            tmp_path / "other-process" / family
        )


def test_build_tiny_models_returns_one_folder_per_family_when_building_from_scratch(
    tmp_path: pathlib.Path,
) -> None:
    folders = tiny.build_tiny_models(tmp_path)

    assert folders == {family: tmp_path / f"tiny-{family}" for family in tiny.TINY_FAMILIES}
    for family, folder in folders.items():
        assert (folder / "model_index.json").is_file()
        assert _stamp(folder)["family"] == family
        assert _stamp(folder)["fingerprint"] == tiny.builder_fingerprint()
    # Only the lock file and the finished folders remain: no staging leftovers.
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        [tiny.LOCK_FILE_NAME, *(f"tiny-{family}" for family in tiny.TINY_FAMILIES)]
    )


def test_build_tiny_models_reuses_the_cached_folder_when_called_again(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folders = tiny.build_tiny_models(tmp_path)
    identities_before = {family: _file_identities(folder) for family, folder in folders.items()}

    def refuse_to_build(family: str, folder: pathlib.Path) -> None:
        raise AssertionError(f"{family} was rebuilt although its cache is valid")

    monkeypatch.setattr(tiny, "save_tiny_pipeline", refuse_to_build)
    assert tiny.build_tiny_models(tmp_path) == folders
    assert {family: _file_identities(folder) for family, folder in folders.items()} == (identities_before)


def test_build_tiny_models_rebuilds_when_the_fingerprint_changes(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tiny.build_tiny_models(tmp_path, ["sd15"])["sd15"]
    identities_before = _file_identities(folder)
    bytes_before = _file_bytes(folder)

    monkeypatch.setattr(tiny, "builder_fingerprint", lambda: "a-newer-builder")
    assert tiny.build_tiny_models(tmp_path, ["sd15"]) == {"sd15": folder}

    assert _stamp(folder)["fingerprint"] == "a-newer-builder"
    identities_after = _file_identities(folder)
    assert all(identities_after[name] != identities_before[name] for name in identities_before)
    # Same builder code, so the rebuilt pipeline files are the same bytes.
    bytes_after = _file_bytes(folder)
    del bytes_before[tiny.STAMP_FILE_NAME], bytes_after[tiny.STAMP_FILE_NAME]
    assert bytes_after == bytes_before


def test_build_tiny_models_rebuilds_when_a_cached_file_is_missing(tmp_path: pathlib.Path) -> None:
    folder = tiny.build_tiny_models(tmp_path, ["flux"])["flux"]
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.unlink()

    tiny.build_tiny_models(tmp_path, ["flux"])

    assert weights.is_file()


def test_build_tiny_models_raises_when_the_family_is_unknown(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="unknown tiny pipeline family"):
        tiny.build_tiny_models(tmp_path, ["sd2"])
    assert not any(tmp_path.iterdir())


def test_build_tiny_pipeline_leaves_the_callers_random_stream_alone_when_building() -> None:
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)

    pipeline = tiny.build_tiny_pipeline("flux")

    assert torch.equal(torch.rand(4), expected)
    assert all(
        not module.training for module in pipeline.components.values() if isinstance(module, torch.nn.Module)
    )


# --- tokenizers and trained weights (#15) ------------------------------------------------------------------------


@pytest.mark.parametrize("family", tiny.TINY_FAMILIES)
def test_every_caption_word_is_one_token_of_every_tokenizer_when_the_family_is_built(family: str) -> None:
    from workbench import shapes

    pipeline = tiny.build_tiny_pipeline(family)
    words = sorted({word for scene in shapes.all_scenes() for word in scene.caption.split()})
    tokenizers = {name: component for name, component in pipeline.components.items() if name.startswith("tokenizer")}
    assert tokenizers
    for name, tokenizer in tokenizers.items():
        split = {word: tokenizer.tokenize(word) for word in words}
        assert {word: pieces for word, pieces in split.items() if len(pieces) != 1} == {}, name
    # Other words still tokenize, character by character.
    assert len(pipeline.tokenizer.tokenize("quokka")) == len("quokka")


def test_trained_weights_of_every_family_are_in_the_repository_within_40_mb() -> None:
    from diffusers_backend import tiny_pipelines

    files = {family: tiny_pipelines.trained_weights_file(family) for family in tiny.TINY_FAMILIES}
    assert {family: path.is_file() for family, path in files.items()} == dict.fromkeys(tiny.TINY_FAMILIES, True)
    assert sum(path.stat().st_size for path in files.values()) <= 40 * 1024 * 1024


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_saved_weights_load_back_into_a_fresh_pipeline_in_half_precision_with_the_vae_factors(
    family: str, tmp_path: pathlib.Path
) -> None:
    from diffusers_backend import tiny_pipelines

    source = tiny_pipelines.build_tiny_pipeline(family, trained=False)
    with torch.no_grad():
        for parameter in source.vae.parameters():
            parameter.add_(0.25)
    source.vae.register_to_config(scaling_factor=0.75, shift_factor=0.5 if family == "sd3" else None)
    weights = tmp_path / f"{family}.safetensors"
    tiny_pipelines.save_tiny_weights(source, weights, {"steps": "1"})

    loaded = tiny_pipelines.build_tiny_pipeline(family, trained=False)
    tiny_pipelines.load_tiny_weights(loaded, weights)

    for name, component in source.components.items():
        if isinstance(component, torch.nn.Module):
            for (key, expected), actual in zip(component.named_parameters(),
                                               getattr(loaded, name).parameters(), strict=True):
                assert actual.dtype == torch.float32
                assert torch.equal(actual, expected.to(torch.float16).to(torch.float32)), f"{name}.{key}"
    assert loaded.vae.config.scaling_factor == 0.75
    assert loaded.vae.config.get("shift_factor") == (0.5 if family == "sd3" else None)


def test_weights_of_another_family_are_refused_with_the_parameters_that_do_not_fit(tmp_path: pathlib.Path) -> None:
    from diffusers_backend import tiny_pipelines

    weights = tmp_path / "sd15.safetensors"
    tiny_pipelines.save_tiny_weights(tiny_pipelines.build_tiny_pipeline("sd15", trained=False), weights, {})
    sdxl = tiny_pipelines.build_tiny_pipeline("sdxl", trained=False)

    with pytest.raises(ValueError, match=r"does not fit the tiny .*retrain it with scripts/train-tiny"):
        tiny_pipelines.load_tiny_weights(sdxl, weights)


def test_the_fingerprint_changes_when_trained_weights_change(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights_folder = tmp_path / "tiny_weights"
    weights_folder.mkdir()
    monkeypatch.setattr(tiny, "_TRAINED_WEIGHTS", weights_folder)
    (weights_folder / "sd15.safetensors").write_bytes(b"first training")
    first = tiny.builder_fingerprint()
    (weights_folder / "sd15.safetensors").write_bytes(b"second training")

    assert tiny.builder_fingerprint() != first
