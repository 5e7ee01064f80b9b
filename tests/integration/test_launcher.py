"""scripts/serve's launcher as operators use it: READY line, private key, clean stop, clear start failures."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import pytest
from tritonclient.utils import InferenceServerException

from inference_client import contract, triton
from inference_client.state import INFER_KEY_FILE, SERVER_FILE
from triton_launcher.errors import ServerStartError
from triton_launcher.installation import MALLOC_TUNABLES
from triton_launcher.repository import (
    STREAM_SUFFIX,
    TINY_CPU_INSTANCES,
    TINY_STREAMING,
    build_tiny_repository,
    with_parameters,
)
from triton_launcher.server import TritonServer, free_ports

from .conftest import TINY_MODELS, tiny_server_options


def test_serve_prints_ready_writes_a_private_key_and_stops_cleanly_when_sent_sigint(
    tiny_repository: Path, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    port, grpc_port, metrics_port = free_ports(3)
    command = [sys.executable, "-m", "triton_launcher", "--model-repository", str(tiny_repository),
               "--http-port", str(port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
               "--state-dir", str(state_dir), "--ready-timeout", "300"]
    launcher_log_path = tmp_path / "launcher.log"
    launcher_log = launcher_log_path.open("w")
    with launcher_log, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=launcher_log, text=True) as launcher:
        try:
            assert launcher.stdout is not None
            assert launcher.stdout.readline().strip() == f"READY http://127.0.0.1:{port}"

            key_file = state_dir / INFER_KEY_FILE
            assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
            assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
            description = json.loads((state_dir / SERVER_FILE).read_text())
            assert description["url"] == f"http://127.0.0.1:{port}"
            streaming = [f"tiny-{family}{STREAM_SUFFIX}" for family in TINY_STREAMING]
            assert sorted(description["models"]) == sorted([*TINY_MODELS, *streaming])
            assert description["streaming_models"] == streaming
            assert description["grpc_address"] == f"127.0.0.1:{grpc_port}"
            key = key_file.read_text().strip()
            assert key not in json.dumps(description)
            assert key not in (state_dir / "tritonserver.log").read_text()
            assert key not in launcher_log_path.read_text()

            server_process = psutil.Process(description["pid"])
            family = [server_process, *server_process.children(recursive=True)]
            stubs = [p for p in family if "triton_python_backend_stub" in p.name()]
            assert len(stubs) == len(TINY_MODELS) * TINY_CPU_INSTANCES + len(streaming)  # one instance each
            for stub in stubs:
                # glibc's loader (2.36) parses GLIBC_TUNABLES in place, writing a NUL after each tunable, so
                # /proc shows them as separate strings: join them back before looking.
                environment = Path(f"/proc/{stub.pid}/environ").read_bytes().replace(b"\0", b":")
                assert f"GLIBC_TUNABLES={MALLOC_TUNABLES}".encode() in environment

            # Streams that have had their image end in order: a cancelled call of a finished request could keep
            # its decoupled model "live" at shutdown until the exit timeout cut it (1 stop in 3, with 2.51).
            for seed in range(5):
                probe = triton.probe_inference(f"127.0.0.1:{port}", f"127.0.0.1:{grpc_port}", streaming[0], key,
                                               streaming=True, timeout_s=120)
                assert probe.shape == (triton.PROBE_SIDE, triton.PROBE_SIDE, 3), seed

            launcher.send_signal(signal.SIGINT)
            assert launcher.wait(timeout=120) == 0, launcher_log_path.read_text()
            _, alive = psutil.wait_procs(family, timeout=30)
            assert alive == []
            assert not (state_dir / SERVER_FILE).exists()
        finally:
            if launcher.poll() is None:
                launcher.kill()


def test_server_start_fails_naming_model_and_parameter_when_config_is_broken(
    tiny_repository: Path, tmp_path: Path
) -> None:
    repository = tmp_path / "repository"
    shutil.copytree(tiny_repository / "tiny-sd15", repository / "tiny-sd15")
    config = repository / "tiny-sd15" / "config.pbtxt"
    # Relative weights path must still resolve from the copied model directory.
    source = os.path.relpath(tiny_repository.parent / "pipelines" / "tiny-sd15", config.parent)
    config.write_text(with_parameters(config.read_text(), {"model_source": source, "max_stepz": "10"}))

    with pytest.raises(ServerStartError) as caught, TritonServer(tiny_server_options(repository, tmp_path / "s")):
        pass
    message = str(caught.value)
    assert "tritonserver exited during start-up" in message
    assert "Triton model 'tiny-sd15' failed to load" in message
    assert "['max_stepz'] are unknown" in message


def test_server_start_fails_with_advice_when_hub_weights_cannot_be_had_offline(
    tiny_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repository = tmp_path / "repository"
    shutil.copytree(tiny_repository / "tiny-sdxl", repository / "tiny-sdxl")
    config = repository / "tiny-sdxl" / "config.pbtxt"
    config.write_text(with_parameters(config.read_text(), {"model_source": "example-org/not-cached-model"}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))

    with pytest.raises(ServerStartError) as caught, TritonServer(tiny_server_options(repository, tmp_path / "s")):
        pass
    message = str(caught.value)
    assert "weights of example-org/not-cached-model cannot be had" in message
    assert "HF_HUB_OFFLINE is set" in message


def test_an_operator_key_from_a_file_opens_the_server_and_survives_the_watchdogs_restart(tmp_path: Path) -> None:
    """Every replica of a deployment started with the same --infer-key-file (a mounted Secret) takes that key,
    and a restart keeps it, so capability hosts holding it are never locked out."""
    repository = build_tiny_repository(tmp_path / "repository", families=("sd15",), streaming=())
    operator_key = "replica-secret-" + "9f8e7d6c5b4a3210" * 2
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "infer-key").write_text(operator_key + "\n")
    options = replace(tiny_server_options(repository, tmp_path / "state"),
                      infer_key_file=tmp_path / "secret" / "infer-key")
    with TritonServer(options) as server:
        assert server.infer_key == operator_key
        assert (tmp_path / "state" / INFER_KEY_FILE).read_text().strip() == operator_key
        request = contract.TextToImage("a red cube", width=64, height=64, num_inference_steps=1, seed=3)
        with server.http_client(timeout_s=120) as client:
            before = triton.infer_http(client, "tiny-sd15", request, operator_key)
            with pytest.raises(InferenceServerException) as refused:
                triton.infer_http(client, "tiny-sd15", request, "some-other-key-of-24-chars")
            assert refused.value.status() == "403"
        # The file changes (a new Secret) while the server runs: a restart keeps the key it started with, and
        # takes the new one only on a new start (a rolling restart of the pods).
        (tmp_path / "secret" / "infer-key").write_text("a-newer-key-that-is-long-enough-9\n")
        server.restart()
        assert server.infer_key == operator_key
        with server.http_client(timeout_s=120) as client:
            after = triton.infer_http(client, "tiny-sd15", request, operator_key)
        assert np.array_equal(before.image, after.image)


def test_an_application_hosts_connections_never_hold_a_servers_stop_up(tmp_path: Path) -> None:
    """tritonserver's stop waits for every open HTTP connection until its exit timeout, then exits as if requests
    had been cut; the capability layer, which outlives servers, keeps none open between its requests."""
    from capability import CapabilityLayer
    from capability.servers import ServerKeys

    repository = build_tiny_repository(tmp_path / "repository", families=("sd15",), streaming=())
    server = TritonServer(replace(tiny_server_options(repository, tmp_path / "state"), exit_timeout_s=60))
    server.start()
    try:
        server.wait_until_ready()
        host = tmp_path / "host"
        host.mkdir(mode=0o700)
        with CapabilityLayer(host) as layer:
            ServerKeys(layer.store, None).register(server.url, tmp_path / "state" / INFER_KEY_FILE)
            authority = layer.create_authority("ops")
            handle = layer.mint("ops", authority.id, {"server_url": server.url, "default_model": "tiny-sd15"})
            image = handle.text_to_image("a red cube", {"width": 64, "height": 64, "numInferenceSteps": 1})
            assert image["width"] == 64
            # The layer stays up, as an application host does, while the server stops.
            assert server.stop(), "stopped in order, not cut at the exit timeout"
    finally:
        server.stop()
