"""Find a tritonserver and its Python backend: the one unpacked into the virtualenv, or one on PATH.

The unpacked one comes from the ``nvidia-pytriton`` wheel (tritonserver 2.51.0 = NGC 24.10), which ships the
Python backend with one stub per Python version. The backend directory Triton wants (``<dir>/python/`` holding
``libtriton_python.so``, ``triton_python_backend_utils.py`` and the stub of the running Python) is assembled
next to it once. On the NGC image, ``tritonserver`` is on PATH with its backends in ``/opt/tritonserver``.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InstallationError

BUNDLED_ROOT = Path(sys.prefix) / "tritonserver"
"""Where scripts/lib/bootstrap.sh unpacks the wheel's ``pytriton/tritonserver`` and ``nvidia_pytriton.libs``."""

MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=67108864"
"""glibc malloc settings for the server and its stubs (``GLIBC_TUNABLES``, glibc 2.26 and later).

By default glibc maps every block over 128 KiB with mmap and returns it on free, and trims the heap above
128 KiB: each denoising step's tensors then come from freshly zeroed pages, and page faults cost tiny-flux
(256², 4 steps, 2 CPUs) 8-12 ms of system time per 35-45 ms request. Blocks up to 32 MiB (glibc's maximum
threshold on 64-bit) from the heap, and up to 64 MiB of free heap kept, made the same request 15-20 % faster
in-process and through Triton alike, with no system time left (docs/measurements.md, "Serving environment"). The
thresholds are fixed, so glibc's own adaptive threshold (which reaches the same state only after a large
batch happens to have run) is off."""

_STUB = "triton_python_backend_stub"
_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")


@dataclass(frozen=True)
class TritonInstallation:
    executable: Path
    backend_directory: Path
    library_path: tuple[Path, ...] = field(default=())
    """Directories to put first on LD_LIBRARY_PATH for the server and its stubs."""

    def environment(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The server's environment: this Python's bin/ first on PATH (the stub runs model.py with the Python
        it finds there, and imports from its site-packages) and the libraries the stub needs."""
        env = with_malloc_tunables(dict(os.environ if base is None else base))
        python_bin = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([python_bin, env.get("PATH", "")]).rstrip(os.pathsep)
        if self.library_path:
            parts = [str(path) for path in self.library_path]
            if env.get("LD_LIBRARY_PATH"):
                parts.append(env["LD_LIBRARY_PATH"])
            env["LD_LIBRARY_PATH"] = os.pathsep.join(parts)
        return env


def with_malloc_tunables(env: dict[str, str]) -> dict[str, str]:
    """``env`` with :data:`MALLOC_TUNABLES` in ``GLIBC_TUNABLES``; tunables already set there come after ours,
    and glibc lets the last setting of a tunable win, so an operator's own choice stays in force."""
    existing = env.get("GLIBC_TUNABLES")
    env["GLIBC_TUNABLES"] = f"{MALLOC_TUNABLES}:{existing}" if existing else MALLOC_TUNABLES
    return env


def find_installation(executable: Path | None = None) -> TritonInstallation:
    """``executable`` if given; else the bundled server of this virtualenv; else ``tritonserver`` on PATH."""
    if executable is not None:
        return _installed(executable)
    bundled = BUNDLED_ROOT / "pytriton" / "tritonserver" / "bin" / "tritonserver"
    if bundled.is_file():
        return _bundled(BUNDLED_ROOT)
    on_path = shutil.which("tritonserver")
    if on_path:
        return _installed(Path(on_path))
    raise InstallationError(
        f"no tritonserver found: neither {bundled} (run scripts/serve or scripts/demo, which unpack it) "
        "nor 'tritonserver' on PATH (the NGC tritonserver image has it)"
    )


def _installed(executable: Path) -> TritonInstallation:
    executable = executable.resolve()
    backends = executable.parent.parent / "backends"
    if not (backends / "python" / "libtriton_python.so").is_file():
        raise InstallationError(f"{executable}: no Python backend at {backends / 'python'}")
    return TritonInstallation(executable=executable, backend_directory=backends)


def _bundled(root: Path) -> TritonInstallation:
    server = root / "pytriton" / "tritonserver"
    python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server / "python_backend_stubs" / python_version / _STUB
    if not stub.is_file():
        raise InstallationError(f"the bundled tritonserver has no Python backend stub for Python {python_version}")
    backends = root / f"backends-py{python_version}"
    python_backend = backends / "python"
    python_backend.mkdir(parents=True, exist_ok=True)
    for source in [server / "backends" / "python" / name for name in _BACKEND_FILES] + [stub]:
        target = python_backend / source.name
        if not (target.is_file() and filecmp.cmp(source, target, shallow=False)):
            temporary = target.with_suffix(".tmp")
            shutil.copy2(source, temporary)
            temporary.replace(target)
    # The copied stub loses its RPATH to the bundled libraries, and it links libpython: it must find this
    # Python's own shared library, not another installation's copy of the same soname.
    python_libdir = Path(str(sysconfig.get_config_var("LIBDIR")))
    return TritonInstallation(
        executable=server / "bin" / "tritonserver",
        backend_directory=backends,
        library_path=(python_libdir, root / "nvidia_pytriton.libs"),
    )


def unpack_server_wheel(wheel: Path, root: Path = BUNDLED_ROOT) -> None:
    """Unpack the server binaries of the ``nvidia-pytriton`` wheel into ``root``, keeping their modes.

    Only ``pytriton/tritonserver/`` and ``nvidia_pytriton.libs/`` are taken: its Python package is not wanted.
    """
    import zipfile

    staging = root.with_name(root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            if not member.filename.startswith(("pytriton/tritonserver/", "nvidia_pytriton.libs/")):
                continue
            target = Path(archive.extract(member, staging))
            mode = (member.external_attr >> 16) & 0o777
            if mode and not member.is_dir():
                target.chmod(mode)
    shutil.rmtree(root, ignore_errors=True)
    staging.replace(root)
