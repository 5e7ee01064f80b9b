"""Sharing the machine's cores among the CPU instances of a server (every model's) generating at the same moment.

Triton runs each instance of a Python-backend model in a process of its own, and each process has its own
torch thread pool. On the CPU that forces a bad choice (measured in docs/measurements.md, "Batching and instances"):

- one thread per instance, two instances on two cores: more throughput under load than one instance, but a
  lone request takes 25 % longer than with every core;
- every core for every instance: a lone request is fast, but two busy instances oversubscribe the cores and
  OpenMP's spinning threads collapse throughput to a tenth.

:class:`CoreSharing` avoids both. The cores are tokens: one lock file per core, shared by every CPU instance of
the server (all models: they run on the same cores), and an instance runs as many torch threads as it holds
tokens. An instance takes its fair share
(``cores // busy instances``) of the free tokens when it starts a generation and re-balances before every
denoising step (the unit of work whose thread count can change): it hands back tokens above its share when
more instances are busy, and takes free ones when fewer are. An instance that finds no free token waits for a
peer's next step. So a lone request gets every core, busy instances split them, and the threads of all
instances together never outnumber the cores.

Busy instances are counted with ``flock`` too: each instance holds an exclusive lock on a file of its own
while it generates. The kernel drops a dead process's locks, so a crashed instance never holds tokens or
counts as busy. The files live in a private per-user directory, one group per server process. Every model
should then have the same ``cpu_threads`` (the number of tokens); the default, every core, is.

The thread count changes floating-point summation order: an image can differ by one uint8 step in a few
pixels (0.001 to 0.004 % of them, measured on the tiny models) between a request that ran with every core and
one that ran with a share; docs/contract.md ("Reproducibility") says what that means for callers.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_SUFFIX = ".busy"
CORE_PREFIX = "core-"
_WAIT_FOR_CORE_S = 0.001
"""Polling interval while every core is held by peers (each gives its extra ones back at its next step)."""


def available_cores() -> int:
    """Cores this process may use: its affinity mask (which taskset and cpusets narrow), lowered to its cgroup's
    CPU quota where that is smaller (what a Kubernetes CPU limit sets, while the mask still shows the node's
    every core): more torch threads than the quota lets run get throttled in turn and spin, as oversubscribed
    cores do."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is None:
        return cores
    # Whole cores, at least one: a fraction of a core cannot run a thread of its own.
    return max(1, min(cores, int(quota)))


def cgroup_cpu_quota(proc_cgroup: Path = Path("/proc/self/cgroup"),
                     root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota (in cores, e.g. 2.5) of this process's cgroup and of those above it, the smallest; None
    when none is set or the files cannot be read. cgroup v1 (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` under
    the ``cpu`` controller's mount) where the cpu controller is mounted there, else v2 (``cpu.max``)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    entries = [line.split(":", 2) for line in lines if line.count(":") >= 2]
    for _, controllers, path in entries:
        if "cpu" in controllers.split(","):
            mount = next((root / name for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu") if (root / name).is_dir()),
                         None)
            if mount is not None:
                return _smallest_quota(mount, path, _v1_quota)
    for hierarchy, controllers, path in entries:
        if hierarchy == "0" and controllers == "":
            return _smallest_quota(root, path, _v2_quota)
    return None


def _smallest_quota(mount: Path, path: str, read: Callable[[Path], float | None]) -> float | None:
    # Inside a container with its own cgroup namespace the path is "/" and the mount is the container's own
    # group; on a host it names the group below the mount. Limits nest, so every level up to the mount counts.
    group = Path(path.strip("/"))
    quotas = [quota for level in (group, *group.parents) if (quota := read(mount / level)) is not None]
    return min(quotas, default=None)


def _v2_quota(directory: Path) -> float | None:
    try:
        quota, period = (directory / "cpu.max").read_text().split()
        return None if quota == "max" or int(period) <= 0 else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _v1_quota(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


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
        self._own = _open(self._own_path)
        self._core_locks = [_open(group / f"{CORE_PREFIX}{index}") for index in range(cores)]
        self._held: list[int] = []
        """Indexes of the core tokens this instance holds."""
        self._peers: dict[Path, int] = {}

    @classmethod
    def for_instance(cls, cores: int, set_threads: Callable[[int], None],
                     parent: Path | None = None) -> CoreSharing | None:
        """Sharing among the CPU instances of this server (the stubs' parent process)."""
        directory = private_directory(parent)
        if directory is None:
            return None
        return cls(directory / f"server-{os.getppid()}", cores, set_threads)

    @contextmanager
    def generating(self) -> Iterator[None]:
        """Count this instance as busy and hold its share of the cores for the duration."""
        fcntl.flock(self._own, fcntl.LOCK_EX)
        try:
            self._refresh_peers()
            self._take(self._share())
            while not self._held:
                time.sleep(_WAIT_FOR_CORE_S)
                self._take(self._share())
            self._apply()
            yield
        finally:
            self._release(len(self._held))
            fcntl.flock(self._own, fcntl.LOCK_UN)

    def rebalance(self) -> None:
        """Between steps: hand back the tokens above this instance's share, or take free ones up to it."""
        share = self._share()
        if len(self._held) > share:
            self._release(len(self._held) - share)
        else:
            self._take(share)
        self._apply()

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
        for descriptor in [*self._peers.values(), *self._core_locks, self._own]:
            os.close(descriptor)
        self._peers.clear()
        self._own_path.unlink(missing_ok=True)
        if not list(self.group.glob(f"*{LOCK_SUFFIX}")):  # the last instance of the group to stop cleans up
            for core in self.group.glob(f"{CORE_PREFIX}*"):
                core.unlink(missing_ok=True)
            with suppress(OSError):  # an instance starting right now may have put a file back
                self.group.rmdir()

    def _share(self) -> int:
        return max(1, self.cores // (1 + self.busy_peers()))

    def _take(self, share: int) -> None:
        for index, descriptor in enumerate(self._core_locks):
            if len(self._held) >= share:
                return
            if index in self._held:
                continue
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            self._held.append(index)

    def _release(self, count: int) -> None:
        for _ in range(count):
            fcntl.flock(self._core_locks[self._held.pop()], fcntl.LOCK_UN)

    def _apply(self) -> None:
        if len(self._held) != self.threads:
            self.threads = len(self._held)
            self._set_threads(self.threads)

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


def _open(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
