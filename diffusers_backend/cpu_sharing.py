"""Sharing the machine's cores among the CPU instances of one model that are generating at the same moment.

Triton runs each instance of a Python-backend model in a process of its own, and each process has its own
torch thread pool. On the CPU that forces a bad choice (measured in README.md, "Batching and instances"):

- one thread per instance, two instances on two cores: 1.9x the throughput of one instance under load, but a
  lone request takes 25 % longer than with every core;
- every core for every instance: a lone request is fast, but two busy instances oversubscribe the cores and
  OpenMP's spinning threads collapse throughput to a tenth.

:class:`CoreSharing` avoids both: an instance uses ``cores // busy`` threads, ``busy`` being the number of
instances of its model generating right now, re-counted before every denoising step (a step is the unit of
work that can change its thread count). A lone request gets every core; under load each instance gets its
share.

Busy instances are counted with ``flock``: each instance holds an exclusive lock on a file of its own while it
generates, and counts the peer files it cannot lock. The kernel drops a lock when its process dies, so a
crashed instance never counts as busy. The files live in a private per-user directory, one group per server
process and model.

The thread count changes floating-point summation order: an image can differ by one uint8 step in a few
pixels (about 0.004 % of them, measured on the tiny models) between a request that ran with all the cores and
one that ran with a share. README.md states what that does to reproducibility.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_SUFFIX = ".busy"


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def private_directory(parent: Path | None = None) -> Path | None:
    """``<tmp>/triton-diffusers-<uid>``, created 0700; None if it exists but is not ours alone (someone else
    could then make our instances believe their peers are busy)."""
    directory = (parent or Path(tempfile.gettempdir())) / f"triton-diffusers-{os.getuid()}"
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        status = directory.lstat()
    except OSError as error:
        logger.warning("CPU core sharing off: cannot create %s: %s", directory, error)
        return None
    if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.getuid() or status.st_mode & 0o077:
        logger.warning("CPU core sharing off: %s is not a directory private to this user", directory)
        return None
    return directory


class CoreSharing:
    """One instance's side of the sharing. Not thread-safe: Triton calls an instance one batch at a time."""

    def __init__(self, group: Path, cores: int, set_threads: Callable[[int], None], name: str | None = None) -> None:
        self.group = group
        self.cores = cores
        self._set_threads = set_threads
        self.threads = 0
        """Threads last set; 0 before the first generation."""
        group.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._own_path = group / f"{name or os.getpid()}{LOCK_SUFFIX}"
        self._own = os.open(self._own_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        self._peers: dict[Path, int] = {}

    @classmethod
    def for_instance(cls, model_name: str, cores: int, set_threads: Callable[[int], None],
                     parent: Path | None = None) -> CoreSharing | None:
        """Sharing among the instances of ``model_name`` in this server (the stubs' parent process)."""
        directory = private_directory(parent)
        if directory is None:
            return None
        # A model name is a Triton directory name: no "/" in it. The parent pid tells servers apart.
        return cls(directory / f"{os.getppid()}-{model_name}", cores, set_threads)

    @contextmanager
    def generating(self) -> Iterator[None]:
        """Count this instance as busy for the duration, with its share of the cores."""
        fcntl.flock(self._own, fcntl.LOCK_EX)
        try:
            self._refresh_peers()
            self._set(self._share())
            yield
        finally:
            fcntl.flock(self._own, fcntl.LOCK_UN)

    def rebalance(self) -> None:
        """Between steps: give up threads if more instances are busy now than when this generation started.

        Never takes threads back mid-generation: a peer that finished one batch usually starts the next
        within milliseconds, and one step with more threads than cores costs more (OpenMP threads spin
        waiting for a descheduled peer) than a step with too few."""
        share = self._share()
        if share < self.threads:
            self._set(share)

    def _share(self) -> int:
        return max(1, self.cores // (1 + self.busy_peers()))

    def _set(self, threads: int) -> None:
        if threads != self.threads:
            self._set_threads(threads)
            self.threads = threads

    def busy_peers(self) -> int:
        busy = 0
        for descriptor in self._peers.values():
            try:
                fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                busy += 1
            else:
                fcntl.flock(descriptor, fcntl.LOCK_UN)
        return busy

    def close(self) -> None:
        for descriptor in self._peers.values():
            os.close(descriptor)
        self._peers.clear()
        os.close(self._own)
        self._own_path.unlink(missing_ok=True)
        with suppress(OSError):  # not empty: the last instance of the group to stop removes it
            self.group.rmdir()

    def _refresh_peers(self) -> None:
        # Instances start and stop rarely: look for new peer files once per batch, not at every step.
        present = {path for path in self.group.glob(f"*{LOCK_SUFFIX}") if path != self._own_path}
        for gone in set(self._peers) - present:
            os.close(self._peers.pop(gone))
        for path in present - set(self._peers):
            try:
                self._peers[path] = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:  # removed in between by an instance that stopped
                continue
