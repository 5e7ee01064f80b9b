"""diffusers_backend.cpu_sharing: CPU instances of one model split the cores among those busy (no torch).

Each CoreSharing here stands for one Triton instance. flock conflicts between open file descriptions, so two
objects in one process behave as two processes would; one test uses a real child process for the crash case.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest

from diffusers_backend import cpu_sharing
from diffusers_backend.cpu_sharing import CoreSharing, private_directory


class Instance:
    """A CoreSharing with a recorder in place of torch.set_num_threads."""

    def __init__(self, group: Path, name: str, cores: int = 4) -> None:
        self.calls: list[int] = []
        self.sharing = CoreSharing(group, cores, self.calls.append, name=name)


@pytest.fixture
def group(tmp_path: Path) -> Path:
    return tmp_path / "server-model"


def test_generating_takes_every_core_when_no_peer_is_busy(group: Path) -> None:
    alone, idle_peer = Instance(group, "a"), Instance(group, "b")
    with alone.sharing.generating():
        assert alone.calls == [4]
    assert idle_peer.calls == []


def test_generating_takes_an_equal_share_when_peers_are_busy(group: Path) -> None:
    first, second, third = Instance(group, "a"), Instance(group, "b"), Instance(group, "c", cores=4)
    with first.sharing.generating(), second.sharing.generating():
        assert second.calls == [2]
        with third.sharing.generating():
            assert third.calls == [1]  # 4 cores // 3 busy


def test_rebalance_gives_up_threads_when_a_peer_starts_mid_generation(group: Path) -> None:
    first, second = Instance(group, "a"), Instance(group, "b")
    with first.sharing.generating(), second.sharing.generating():
        first.sharing.rebalance()
    assert first.calls == [4, 2]


def test_rebalance_keeps_its_threads_when_a_peer_stops_mid_generation(group: Path) -> None:
    first, second = Instance(group, "a"), Instance(group, "b")
    peer = ExitStack()
    peer.enter_context(second.sharing.generating())
    with first.sharing.generating():
        peer.close()  # the peer finishes while the first is mid-way
        first.sharing.rebalance()
        assert first.calls == [2]
    with first.sharing.generating():
        assert first.calls == [2, 4]  # taken back at the next generation


def test_busy_peers_counts_none_when_a_peer_process_died_holding_its_lock(group: Path) -> None:
    first = Instance(group, "a")
    child = (
        "import sys\n"
        "from pathlib import Path\n"
        "from diffusers_backend.cpu_sharing import CoreSharing\n"
        "sharing = CoreSharing(Path(sys.argv[1]), 4, lambda threads: None, name='child')\n"
        "with sharing.generating():\n"
        "    print('busy', flush=True)\n"
        "    sys.stdin.read()\n"
    )
    with subprocess.Popen([sys.executable, "-c", child, str(group)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True, cwd=Path(__file__).parents[2]) as holder:
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline() == "busy\n"
            with first.sharing.generating():
                assert first.calls == [2]
            holder.send_signal(signal.SIGKILL)
            holder.wait(timeout=30)
            with first.sharing.generating():
                assert first.calls == [2, 4]  # the kernel released the dead process's lock
        finally:
            holder.kill()


def test_close_removes_the_lock_file_and_the_group_when_the_last_instance_stops(group: Path) -> None:
    first, second = Instance(group, "a"), Instance(group, "b")
    first.sharing.close()
    assert sorted(path.name for path in group.iterdir()) == ["b.busy"]
    second.sharing.close()
    assert not group.exists()


def test_for_instance_names_the_group_after_the_server_process_and_model(tmp_path: Path) -> None:
    sharing = CoreSharing.for_instance("tiny-sd15", 2, lambda threads: None, parent=tmp_path)
    assert sharing is not None
    assert sharing.group == tmp_path / f"triton-diffusers-{os.getuid()}" / f"{os.getppid()}-tiny-sd15"
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


def test_available_cores_counts_the_affinity_mask_when_on_linux() -> None:
    assert cpu_sharing.available_cores() == len(os.sched_getaffinity(0))
