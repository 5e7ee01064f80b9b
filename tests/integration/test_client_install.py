"""The base install is the client side, as an application host gets it: a fresh virtualenv with nothing but
``pip install <this project>`` has no torch and no diffusers, and its ``capability`` command mints, delegates,
gives and generates against the real tiny server, over HTTP and, with progress, over gRPC.

The wheel is built from a copy of the project's sources (no build output in the checkout); its dependencies come
from the package index, or pip's cache once the set-up has fetched them.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from inference_client.state import INFER_KEY_FILE
from triton_launcher.paths import PROJECT_ROOT
from triton_launcher.server import TritonServer

from .conftest import Generator

PACKAGES = ("inference_client", "capability", "triton_launcher", "diffusers_backend", "workbench")
MODEL_SIDE = ("torch", "diffusers", "transformers", "huggingface_hub", "accelerate", "safetensors", "tokenizers")
INSTALL_TIMEOUT_S = 600


@dataclass(frozen=True)
class ClientInstall:
    venv: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def capability(self, state_dir: Path, *arguments: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
        """The installed ``capability`` command (the console script, not ``python -m``)."""
        completed = subprocess.run([str(self.venv / "bin" / "capability"), *arguments, "--state-dir", str(state_dir)],
                                   capture_output=True, text=True, timeout=300, check=False)
        assert completed.returncode == expect, completed.stdout + completed.stderr
        return completed

    def json(self, state_dir: Path, *arguments: str) -> Any:
        return json.loads(self.capability(state_dir, *arguments, "--json").stdout)


@pytest.fixture(scope="module")
def client_install(tmp_path_factory: pytest.TempPathFactory) -> ClientInstall:
    scratch = tmp_path_factory.mktemp("client-install")
    source = scratch / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(PROJECT_ROOT / name, source / name)
    for package in PACKAGES:
        shutil.copytree(PROJECT_ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    pip = ("-m", "pip", "--disable-pip-version-check", "--quiet")
    # The development venv's setuptools builds it; the fresh venv then installs the wheel with its dependencies.
    subprocess.run([sys.executable, *pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(scratch / "wheel"),
                    str(source)], check=True, timeout=INSTALL_TIMEOUT_S)
    venv = scratch / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=INSTALL_TIMEOUT_S)
    wheel = next((scratch / "wheel").glob("*.whl"))
    subprocess.run([str(venv / "bin" / "python"), *pip, "install", str(wheel)], check=True, timeout=INSTALL_TIMEOUT_S)
    return ClientInstall(venv)


def test_the_base_install_has_no_model_side(client_install: ClientInstall) -> None:
    probe = ("import importlib.util, json, sys; "
             f"print(json.dumps([name for name in {list(MODEL_SIDE)!r} if importlib.util.find_spec(name)]))")
    found = subprocess.run([str(client_install.python), "-c", probe], capture_output=True, text=True, check=True,
                           timeout=60)
    assert json.loads(found.stdout) == []
    listed = subprocess.run([str(client_install.python), "-m", "pip", "list", "--format", "json"],
                            capture_output=True, text=True, check=True, timeout=120)
    installed = {entry["name"].lower() for entry in json.loads(listed.stdout)}
    assert {"triton-diffusers", "tritonclient", "grpcio", "numpy", "isal"} <= installed
    assert installed.isdisjoint(MODEL_SIDE)


def test_the_client_install_mints_delegates_and_generates_against_the_tiny_server(
    client_install: ClientInstall, tiny_server: TritonServer, generator: Generator, tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    # The server is not this state dir's own: its key is registered, as on an application host.
    client_install.capability(state, "init", "--admin", "ops")
    authority = client_install.json(state, "list", "--as", "ops")[0]["id"]
    client_install.capability(
        state, "register-server", "--url", tiny_server.url,
        "--key-file", str(tiny_server.options.state_dir / INFER_KEY_FILE),
        "--grpc-address", f"127.0.0.1:{tiny_server.options.grpc_port}")
    minted = client_install.json(state, "mint", "--as", "ops", "--authority", authority, "--server-url",
                                 tiny_server.url, "--default-model", "tiny-sd15")["id"]
    narrow = client_install.json(state, "delegate", "--as", "ops", "--cap", minted, "--max-width", "128",
                                 "--max-height", "128", "--max-steps", "4")["id"]
    client_install.capability(state, "give", "--as", "ops", "--cap", narrow, "--to", "bob")

    reference = generator.generate("tiny-sd15", "a red cube on a table", width=64, height=64,
                                   num_inference_steps=2, seed=3).image
    for extra in ((), ("--progress",)):  # HTTP, then the streaming variant over gRPC
        out = tmp_path / f"bob{len(extra)}.png"
        result = client_install.json(state, "generate", "--as", "bob", "--cap", narrow, "--prompt",
                                     "a red cube on a table", "--width", "64", "--height", "64", "--steps", "2",
                                     "--seed", "3", "--out", str(out), *extra)
        assert (result["width"], result["height"], result["seed"], result["model"]) == (64, 64, 3, "tiny-sd15")
        with Image.open(io.BytesIO(out.read_bytes())) as image:
            assert np.array_equal(np.asarray(image.convert("RGB")), reference)

    refused = client_install.capability(state, "generate", "--as", "bob", "--cap", narrow, "--prompt", "a red cube",
                                        "--width", "256", "--height", "64", "--steps", "2", expect=1)
    assert "width=256 exceeds max_width=128" in refused.stderr
    generations = client_install.json(state, "audit", "--as", "ops", "--action", "generate")
    assert [entry["outcome"] for entry in generations] == ["ok", "ok", "denied"]


def test_the_wheel_carries_the_web_page_and_serve_without_the_extra_says_what_to_install(
    client_install: ClientInstall, tmp_path: Path,
) -> None:
    wheel = next((client_install.venv.parent / "wheel").glob("*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {"capability/service/static/index.html", "capability/service/static/app.js",
            "capability/service/static/style.css"} <= names
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    client_install.capability(state, "init", "--admin", "ops")
    refused = client_install.capability(state, "serve", "--port", "0", expect=1)
    assert "the HTTP service needs the [service] extra" in refused.stderr
    assert "pip install 'triton-diffusers[service]'" in refused.stderr
