"""Progress and cancellation through the real tritonserver: the streaming variant tiny-sd15-stream, over gRPC.

Server-side evidence for cancellation is the model's own log line, "cancelled by the caller after step k of
N", which it writes when its step callback stops the pipeline.
"""

from __future__ import annotations

import base64
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from capability import (
    CapabilityHandle,
    CapabilityLayer,
    GenerationCancelledError,
    ModelNotServedError,
    Progress,
)
from triton_launcher.server import TritonServer

MODEL = "tiny-sd15"
WAIT_S = 120.0


@pytest.fixture(scope="module")
def streaming_layer(tiny_server: TritonServer) -> Iterator[CapabilityLayer]:
    with CapabilityLayer(tiny_server.options.state_dir) as layer:
        yield layer


@pytest.fixture(scope="module")
def alice(streaming_layer: CapabilityLayer, tiny_server: TritonServer) -> CapabilityHandle:
    authority = streaming_layer.create_authority("sys").id
    return streaming_layer.mint("sys", authority, {"server_url": tiny_server.url, "default_model": MODEL}).give("alice")


def pixels(result: dict[str, object]) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(str(result["image"])))) as image:
        return np.asarray(image.convert("RGB"))


def test_progress_comes_once_per_step_in_order_and_the_image_is_the_non_streaming_one(alice: CapabilityHandle) -> None:
    options = {"width": 128, "height": 96, "numInferenceSteps": 6, "seed": 21}
    seen: list[Progress] = []
    streamed = alice.text_to_image("a lighthouse at dusk", options, on_progress=seen.append)
    plain = alice.text_to_image("a lighthouse at dusk", options)

    total = seen[-1].steps
    assert total >= 6  # the scheduler's passes: SD1.5's PNDM makes one more than asked
    assert [progress.steps_done for progress in seen] == list(range(1, total + 1))
    assert {progress.steps for progress in seen} == {total}
    assert [progress.elapsed_s for progress in seen] == sorted(progress.elapsed_s for progress in seen)
    assert (streamed["width"], streamed["height"], streamed["seed"]) == (128, 96, 21)
    np.testing.assert_array_equal(pixels(streamed), pixels(plain))


def test_cancel_stops_the_generation_on_the_server_within_a_step_and_the_next_request_works(
    alice: CapabilityHandle, streaming_layer: CapabilityLayer, tiny_server: TritonServer,
) -> None:
    log = Path(str(tiny_server.log_path))
    log_size = log.stat().st_size
    steps_seen: list[int] = []
    under_way = threading.Event()

    def on_progress(progress: Progress) -> None:
        steps_seen.append(progress.steps_done)
        if progress.steps_done >= 2:
            under_way.set()

    generation = alice.start_text_to_image("a long one", {"width": 512, "height": 512, "numInferenceSteps": 100},
                                           on_progress=on_progress)
    assert under_way.wait(WAIT_S)
    generation.cancel()
    cancelled_at = max(steps_seen)
    with pytest.raises(GenerationCancelledError, match=r"cancelled by the caller at step \d+ of 10\d"):
        generation.result(WAIT_S)

    stopped = _wait_for(lambda: re.search(r"tiny-sd15: 1 request\(s\) cancelled by the caller after step (\d+) of "
                                          r"(\d+)", log.read_bytes()[log_size:].decode(errors="replace")))
    steps_run, total = int(stopped[1]), int(stopped[2])
    outcomes = [entry["outcome"] for entry in streaming_layer.capabilities.audit_log("alice", alice.id)]
    assert outcomes[-1] == "cancelled"
    assert streaming_layer.store.read().execute("SELECT COUNT(*) FROM leases").fetchone()[0] == 0
    # The model asks after every step: it stops at the first step that ends after the cancel reached it. The
    # caller's last progress may lag the server by a step, and the cancel takes a moment to arrive: allow a few.
    assert cancelled_at <= steps_run <= cancelled_at + 5 < total
    # And its CPU is free: while a plain generation runs elsewhere, the streaming stub burns next to nothing
    # (one 512x512 step of the tiny SD1.5 costs it about 0.1 s of CPU; 90 more would cost seconds).
    stub = _stream_stub(tiny_server)
    before = sum(stub.cpu_times()[:2])
    alice.text_to_image("meanwhile", {"width": 256, "height": 256, "numInferenceSteps": 8})
    assert sum(stub.cpu_times()[:2]) - before < 0.5
    after = alice.text_to_image("next", {"width": 64, "height": 64, "numInferenceSteps": 2}, on_progress=lambda _: None)
    assert (after["width"], after["height"]) == (64, 64)


def test_progress_for_a_model_without_a_streaming_variant_is_refused_with_how_to_add_one(
    streaming_layer: CapabilityLayer, alice: CapabilityHandle,
) -> None:
    flux = alice.delegate({"allowed_models": ["tiny-flux"], "default_model": "tiny-flux"})
    with pytest.raises(ModelNotServedError, match=r"tiny-flux' has no streaming variant .*add_model --streaming"):
        flux.text_to_image("a boat", {"width": 64, "height": 64}, on_progress=lambda _: None)


def test_cli_shows_a_progress_bar_and_ctrl_c_cancels_on_the_server(
    alice: CapabilityHandle, tiny_server: TritonServer, tmp_path: Path,
) -> None:
    command = [sys.executable, "-m", "capability", "generate", "--state-dir", str(tiny_server.options.state_dir),
               "--as", "alice", "--cap", alice.id, "--progress"]
    done = subprocess.run([*command, "--prompt", "a kite", "--width", "64", "--height", "64", "--steps", "3",
                           "--out", str(tmp_path / "kite.png")], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert re.search(r"\[#+\] (\d+)/\1 steps", done.stderr)  # the bar, full at the end
    assert (tmp_path / "kite.png").is_file()

    # Ctrl-C as at a terminal, even where this suite runs in the background: a shell starts background jobs
    # with SIGINT ignored, which the child would inherit (and Python then never raises KeyboardInterrupt).
    interrupted = subprocess.Popen([*command, "--prompt", "a long kite", "--width", "512", "--height", "512",
                                    "--steps", "100"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                   preexec_fn=_default_sigint)  # noqa: PLW1509 - only a signal disposition
    try:
        assert interrupted.stderr is not None
        shown = b""
        deadline = time.monotonic() + WAIT_S
        while b" steps " not in shown and time.monotonic() < deadline:  # the bar is drawn: it is under way
            shown += os.read(interrupted.stderr.fileno(), 4096)
        interrupted.send_signal(signal.SIGINT)
        _, rest = interrupted.communicate(timeout=WAIT_S)
    finally:
        if interrupted.poll() is None:
            interrupted.kill()
            interrupted.wait()
    assert interrupted.returncode == 130, (shown + rest).decode(errors="replace")
    assert b"cancelled: cancelled by the caller at step" in shown + rest


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _stream_stub(server: TritonServer) -> psutil.Process:
    assert server.process is not None
    [stub] = [process for process in psutil.Process(server.process.pid).children(recursive=True)
              if f"/{MODEL}-stream/1/model.py" in " ".join(process.cmdline())]
    return stub


def _wait_for(find: Callable[[], re.Match[str] | None]) -> re.Match[str]:
    deadline = time.monotonic() + WAIT_S
    while (found := find()) is None:
        if time.monotonic() > deadline:
            pytest.fail(f"nothing found in {WAIT_S:.0f} s")
        time.sleep(0.05)
    return found
