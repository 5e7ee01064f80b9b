"""The layer contracts (pyproject.toml's [tool.importlinter]) hold, and a wrong import breaks them.

scripts/test runs ``lint-imports`` on the tree; here each contract is shown to fail on a copy of the packages
with one deliberately wrong import, so a contract that could never fail would be noticed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from triton_launcher.paths import PROJECT_ROOT

PACKAGES = ("inference_client", "capability", "triton_launcher", "diffusers_backend", "workbench")
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is a [dev] tool: the Python 3.10 "
                                "check of the torch-free tests installs only the base install and pytest")


def lint_imports(root: Path, *contracts: str) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` with the project's contracts (or only ``contracts``, by id), on the packages in ``root``."""
    environment = {**os.environ, "PYTHONPATH": str(root)}
    only = [argument for contract in contracts for argument in ("--contract", contract)]
    return subprocess.run([str(LINT_IMPORTS), "--config", str(PROJECT_ROOT / "pyproject.toml"), "--no-cache", *only],
                          cwd=root, env=environment, capture_output=True, text=True, timeout=120, check=False)


def test_the_tree_keeps_every_layer_contract() -> None:
    result = lint_imports(PROJECT_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 4 kept, 0 broken." in result.stdout


@pytest.mark.parametrize(
    ("module", "wrong_import", "contract"),
    [
        # The circle issue 11 found: the capability layer reaching into the launcher for a helper.
        ("capability/store.py", "from triton_launcher.server import prepare_state_dir", "layers"),
        ("inference_client/contract.py", "import capability", "layers"),
        ("triton_launcher/watchdog.py", "from capability import CapabilityLayer", "layers"),
        # An application host's install has no torch, and the client no model side.
        ("capability/png.py", "import torch", "client-install"),
        ("inference_client/triton.py", "from diffusers_backend import families", "client-install"),
        ("diffusers_backend/engine.py", "from inference_client.state import STATE_DIR", "model-side"),
        # The HTTP service is above the core: the core neither calls it nor needs the web stack.
        ("capability/generation.py", "from capability.service import app", "service-above-core"),
        ("capability/store.py", "import fastapi", "service-above-core"),
    ],
    ids=["capability->launcher", "client->capability", "launcher->capability", "capability->torch",
         "client->model-side", "model-side->client-state", "core->service", "core->fastapi"],
)
def test_a_wrong_import_breaks_its_contract(tmp_path: Path, module: str, wrong_import: str, contract: str) -> None:
    for package in PACKAGES:
        shutil.copytree(PROJECT_ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    assert lint_imports(tmp_path, contract).returncode == 0, "the copy keeps the contract before the change"
    target = tmp_path / module
    target.write_text(target.read_text(encoding="utf-8") + f"\n{wrong_import}\n", encoding="utf-8")

    result = lint_imports(tmp_path, contract)

    assert result.returncode == 1, result.stdout
    assert "Contracts: 0 kept, 1 broken." in result.stdout
    importer = module.removesuffix(".py").replace("/", ".")
    imported = wrong_import.split()[1]
    assert f"{importer} -> {imported}" in result.stdout
