"""The GPU image and the local launcher stay in step: same repository, same launcher flags, same pins."""

from __future__ import annotations

import re
import sys

import pytest

from triton_launcher.paths import PROJECT_ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (the NGC image's) has no tomllib
    tomllib = pytest.importorskip("tomli")

PYPROJECT = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
DOCKERFILE = (PROJECT_ROOT / "docker" / "Dockerfile").read_text()


def test_image_is_built_from_the_ngc_release_of_the_bundled_server_when_defaults_are_used() -> None:
    server = PYPROJECT["tool"]["triton-diffusers"]["server"]
    assert f"ARG TRITON_RELEASE={server['ngc-release']}" in DOCKERFILE
    assert "FROM ${TRITON_REGISTRY}/nvidia/tritonserver:${TRITON_RELEASE}-py3" in DOCKERFILE
    # NGC 24.10 ships tritonserver 2.51.0; the client must speak the same version.
    assert (server["ngc-release"], server["triton-version"]) == ("24.10", "2.51.0")
    assert "tritonclient[http]==2.51.0" in PYPROJECT["project"]["dependencies"]


def test_image_runs_the_same_launcher_and_repository_as_scripts_serve_when_started() -> None:
    serve = (PROJECT_ROOT / "scripts" / "serve").read_text()
    assert '-m triton_launcher "$@"' in serve
    assert 'ENTRYPOINT ["python3", "-m", "triton_launcher"' in DOCKERFILE
    assert "COPY model_repository ./model_repository" in DOCKERFILE
    assert re.search(r"pip install [^\n]*-e \.", DOCKERFILE), "the image installs pyproject.toml's pins"
    assert "USER triton" in DOCKERFILE


@pytest.mark.parametrize("python_version", ["3.10", "3.11"])
def test_every_dependency_has_exactly_one_exact_pin_when_resolved_for_a_python_version(python_version: str) -> None:
    pins: dict[str, list[str]] = {}
    for requirement in PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["dev"]:
        specifier, _, marker = requirement.partition(";")
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)(\[[a-z,]+\])?==([0-9][0-9A-Za-z.+]*)\s*", specifier)
        assert match, f"{requirement!r} is not pinned with =="
        if marker and not _marker_holds(marker, python_version):
            continue
        pins.setdefault(match[1].lower(), []).append(match[3])
    assert all(len(versions) == 1 for versions in pins.values()), pins
    assert {"torch", "diffusers", "transformers", "numpy", "tritonclient"} <= set(pins)


def _marker_holds(marker: str, python_version: str) -> bool:
    match = re.fullmatch(r"\s*python_version\s*(>=|<)\s*'(\d+\.\d+)'\s*", marker)
    assert match, f"unexpected marker {marker!r}"
    version = tuple(int(part) for part in python_version.split("."))
    bound = tuple(int(part) for part in match[2].split("."))
    return version >= bound if match[1] == ">=" else version < bound
