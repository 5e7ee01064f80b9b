"""The server's environment (no server)."""

from __future__ import annotations

from pathlib import Path

from triton_launcher.installation import MALLOC_TUNABLES, TritonInstallation, with_malloc_tunables


def test_with_malloc_tunables_sets_ours_when_none_are_set() -> None:
    assert with_malloc_tunables({"PATH": "/bin"}) == {"PATH": "/bin", "GLIBC_TUNABLES": MALLOC_TUNABLES}


def test_with_malloc_tunables_puts_the_operators_after_ours_so_that_theirs_win() -> None:
    env = with_malloc_tunables({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"})
    assert env["GLIBC_TUNABLES"] == f"{MALLOC_TUNABLES}:glibc.malloc.trim_threshold=0"


def test_environment_puts_libraries_first_and_sets_malloc_tunables_when_built(tmp_path: Path) -> None:
    installation = TritonInstallation(tmp_path / "tritonserver", tmp_path / "backends", (tmp_path / "libs",))
    env = installation.environment({"LD_LIBRARY_PATH": "/opt/lib", "PATH": "/usr/bin"})
    assert env["LD_LIBRARY_PATH"] == f"{tmp_path / 'libs'}:/opt/lib"
    assert env["GLIBC_TUNABLES"] == MALLOC_TUNABLES
    assert env["PATH"].endswith(":/usr/bin")
