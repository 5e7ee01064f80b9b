"""diffusers_backend.cpu_sharing: a server's CPU instances split the cores among those busy (no torch).

Each CoreSharing here stands for one Triton instance. flock conflicts between open file descriptions, so two
objects in one process behave as two processes would; one test uses a real child process for the crash case.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from diffusers_backend import cpu_sharing
from diffusers_backend.cpu_sharing import CoreSharing, private_directory


class Instance:
    """A CoreSharing with a recorder in place of torch.set_num_threads."""

    def __init__(self, group: Path, name: str, cores: int = 4) -> None:
        self.calls: list[int] = []
        self.sharing = CoreSharing(group, cores, self.calls.append, name=name)


class Generation:
    """An instance generating on a thread of its own until told to stop, as a peer process would."""

    def __init__(self, instance: Instance) -> None:
        self.started = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(instance,))
        self.thread.start()

    def _run(self, instance: Instance) -> None:
        with instance.sharing.generating():
            self.started.set()
            self.stop.wait(timeout=30)

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.001)


@pytest.fixture
def group(tmp_path: Path) -> Path:
    return tmp_path / "server-model"


def test_generating_takes_every_core_when_no_peer_is_busy(group: Path) -> None:
    alone, idle_peer = Instance(group, "a"), Instance(group, "b")
    with alone.sharing.generating():
        assert alone.calls == [4]
    assert idle_peer.calls == []


def test_a_peer_waits_for_cores_until_the_busy_instance_hands_back_its_extra_ones_at_a_step(group: Path) -> None:
    first, second = Instance(group, "a"), Instance(group, "b")
    with first.sharing.generating():
        assert first.calls == [4]
        peer = Generation(second)
        wait_until(lambda: first.sharing.busy_peers() == 1)
        assert not peer.started.is_set()  # every core is taken: the peer may not oversubscribe them
        first.sharing.rebalance()
        assert first.calls == [4, 2]
        assert peer.started.wait(timeout=10)
        # The holder hands its two extra cores back one lock at a time: a waiter polling in between starts with
        # one, and takes the other at its next step. Never more than the cores between them.
        assert second.calls in ([2], [1]), second.calls
        second.sharing.rebalance()  # its next step (its thread only waits meanwhile)
        assert second.calls[-1] == 2
        assert first.calls[-1] + second.calls[-1] <= 4
        peer.finish()
        first.sharing.rebalance()
        assert first.calls == [4, 2, 4]  # free again: taken back at the next step


def test_instances_never_hold_more_threads_than_cores_when_three_share_four(group: Path) -> None:
    first, second, third = (Instance(group, name) for name in "abc")
    with first.sharing.generating():
        peers = [Generation(second), Generation(third)]
        wait_until(lambda: first.sharing.busy_peers() == 2)
        first.sharing.rebalance()
        for peer in peers:
            assert peer.started.wait(timeout=10)
        first.sharing.rebalance()
        threads = [instance.calls[-1] for instance in (first, second, third)]
        assert threads == [1, 1, 1]  # 4 // 3 each; the fourth core stays free rather than unfairly given
        for peer in peers:
            peer.finish()


def test_a_waiting_instance_gets_the_cores_when_their_holder_process_dies(group: Path) -> None:
    child = (
        "import sys\n"
        "from pathlib import Path\n"
        "from diffusers_backend.cpu_sharing import CoreSharing\n"
        "sharing = CoreSharing(Path(sys.argv[1]), 4, lambda threads: None, name='child')\n"
        "with sharing.generating():\n"
        "    print('busy', flush=True)\n"
        "    sys.stdin.read()\n"
    )
    waiting = Instance(group, "a")
    with subprocess.Popen([sys.executable, "-c", child, str(group)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True, cwd=Path(__file__).parents[2]) as holder:
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline() == "busy\n"
            peer = Generation(waiting)
            assert not peer.started.wait(timeout=0.2)  # the child holds every core
            holder.send_signal(signal.SIGKILL)
            holder.wait(timeout=30)
            assert peer.started.wait(timeout=10)  # the kernel released the dead process's locks
            # Its share may have been counted a moment before the holder died (2 of 4): the next step fixes it.
            assert waiting.calls[0] in (2, 4)
            waiting.sharing.rebalance()
            assert waiting.calls[-1] == 4
            peer.finish()
        finally:
            holder.kill()


def test_close_removes_the_lock_file_and_the_group_when_the_last_instance_stops(group: Path) -> None:
    first, second = Instance(group, "a"), Instance(group, "b")
    first.sharing.close()
    assert sorted(path.name for path in group.iterdir()) == ["b.busy", "core-0", "core-1", "core-2", "core-3"]
    second.sharing.close()
    assert not group.exists()


def test_for_instance_names_the_group_after_the_server_process_whatever_the_model(tmp_path: Path) -> None:
    sharing = CoreSharing.for_instance(2, lambda threads: None, parent=tmp_path)
    assert sharing is not None
    assert sharing.group == tmp_path / f"triton-diffusers-{os.getuid()}" / f"server-{os.getppid()}"
    sharing.close()


def test_private_directory_refuses_when_others_may_write_to_it(tmp_path: Path) -> None:
    shared = tmp_path / f"triton-diffusers-{os.getuid()}"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    assert private_directory(tmp_path) is None


def test_private_directory_refuses_when_it_is_a_symlink(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (tmp_path / f"triton-diffusers-{os.getuid()}").symlink_to(elsewhere)
    assert private_directory(tmp_path) is None


def test_available_cores_counts_the_affinity_mask_when_no_quota_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_sharing, "cgroup_cpu_quota", lambda: None)
    assert cpu_sharing.available_cores() == len(os.sched_getaffinity(0))


@pytest.mark.parametrize(("quota", "expected"), [(0.5, 1), (1.0, 1), (1.9, 1), (1000.0, None)])
def test_available_cores_is_lowered_to_whole_cores_of_the_cgroup_quota(
    monkeypatch: pytest.MonkeyPatch, quota: float, expected: int | None
) -> None:
    monkeypatch.setattr(cpu_sharing, "cgroup_cpu_quota", lambda: quota)
    assert cpu_sharing.available_cores() == (expected or len(os.sched_getaffinity(0)))


def write_tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_cgroup_v2_quota_is_the_smallest_on_the_way_up_to_the_mount(tmp_path: Path) -> None:
    write_tree(tmp_path, {"proc": "0::/kubepods/pod1/container\n",
                          "cg/cpu.max": "max 100000\n",
                          "cg/kubepods/cpu.max": "800000 100000\n",
                          "cg/kubepods/pod1/cpu.max": "250000 100000\n",
                          "cg/kubepods/pod1/container/cpu.max": "max 100000\n"})
    assert cpu_sharing.cgroup_cpu_quota(tmp_path / "proc", tmp_path / "cg") == 2.5


def test_cgroup_v2_in_its_own_namespace_reads_the_mounts_own_limit(tmp_path: Path) -> None:
    write_tree(tmp_path, {"proc": "0::/\n", "cg/cpu.max": "150000 100000\n"})
    assert cpu_sharing.cgroup_cpu_quota(tmp_path / "proc", tmp_path / "cg") == 1.5


def test_cgroup_v2_without_a_limit_is_none(tmp_path: Path) -> None:
    write_tree(tmp_path, {"proc": "0::/\n", "cg/cpu.max": "max 100000\n"})
    assert cpu_sharing.cgroup_cpu_quota(tmp_path / "proc", tmp_path / "cg") is None


def test_cgroup_v1_cpu_controller_wins_over_the_unified_line(tmp_path: Path) -> None:
    write_tree(tmp_path, {"proc": "4:memory:/x\n2:cpu,cpuacct:/docker/abc\n0::/\n",
                          "cg/cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000\n",
                          "cg/cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
                          "cg/cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
                          "cg/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
                          "cg/cpu.max": "100000 100000\n"})
    assert cpu_sharing.cgroup_cpu_quota(tmp_path / "proc", tmp_path / "cg") == 3.0


@pytest.mark.parametrize("files", [
    {},                                                        # no /proc/self/cgroup (not Linux)
    {"proc": "0::/\n"},                                        # no cpu.max (controller not enabled)
    {"proc": "0::/\n", "cg/cpu.max": "garbage\n"},
    {"proc": "0::/\n", "cg/cpu.max": "100000 0\n"},
    {"proc": "1:cpu:/\n", "cg/cpu/cpu.cfs_quota_us": "-1\n", "cg/cpu/cpu.cfs_period_us": "100000\n"},
])
def test_cgroup_quota_is_none_when_unset_or_unreadable(tmp_path: Path, files: dict[str, str]) -> None:
    (tmp_path / "cg").mkdir()
    write_tree(tmp_path, files)
    assert cpu_sharing.cgroup_cpu_quota(tmp_path / "proc", tmp_path / "cg") is None
