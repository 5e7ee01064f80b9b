"""The container's health check without a server: no description, or nothing listening, is exit 1 with the reason.
tests/integration/test_healthcheck.py runs it against the real tritonserver."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inference_client import triton
from inference_client.state import INFER_KEY_FILE, INFER_KEY_HEADER, SERVER_FILE
from triton_launcher import healthcheck
from triton_launcher.server import free_ports


def write_state_dir(state_dir: Path, models: list[str], streaming_models: list[str]) -> None:
    """What the launcher writes once its server is ready, for a server on ports where nothing listens."""
    http_port, grpc_port = free_ports(2)
    state_dir.mkdir(mode=0o700)
    (state_dir / SERVER_FILE).write_text(json.dumps({
        "url": f"http://127.0.0.1:{http_port}", "grpc_address": f"127.0.0.1:{grpc_port}", "models": models,
        "streaming_models": streaming_models, "infer_key_file": INFER_KEY_FILE, "infer_key_header": INFER_KEY_HEADER,
    }))
    (state_dir / INFER_KEY_FILE).write_text("some-key\n")


def test_a_state_dir_without_a_server_is_unhealthy_and_says_why(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert healthcheck.main(["--state-dir", str(tmp_path)]) == 1
    assert f"no server is serving from {tmp_path}" in capsys.readouterr().err


def test_a_damaged_server_description_is_unhealthy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / SERVER_FILE).write_text("{not json")
    assert healthcheck.main(["--state-dir", str(tmp_path)]) == 1
    assert "cannot read the server description" in capsys.readouterr().err


def test_every_model_of_a_server_that_does_not_answer_is_reported(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    state_dir = tmp_path / "state"
    write_state_dir(state_dir, ["plain", "streaming"], ["streaming"])
    assert healthcheck.main(["--state-dir", str(state_dir), "--timeout", "30"]) == 1
    output = capsys.readouterr()
    assert output.out == ""
    assert "unhealthy: plain: inference failed" in output.err
    assert "unhealthy: streaming: inference failed" in output.err  # tried over gRPC, where nothing listens either
    assert "2 failure(s)" in output.err


def test_a_non_positive_timeout_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        healthcheck.parse_arguments(["--state-dir", str(tmp_path), "--timeout", "0"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("refusal", ["Exceeds maximum queue size", "Request timeout expired"])
def test_a_model_whose_queue_refuses_the_probe_is_busy_not_broken(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, refusal: str,
) -> None:
    """Triton's queue policy answers 503 with these words: the model works and has too much to do. A readiness
    check that failed on it would take every saturated pod out of its Service, one after the other."""
    from tritonclient.utils import InferenceServerException

    state_dir = tmp_path / "state"
    write_state_dir(state_dir, ["busy", "broken"], [])

    def probe(_http: str, _grpc: str, model: str, *_args: object, **_options: object) -> object:
        if model == "busy":
            raise InferenceServerException(msg=f"[request id: <id_unknown>] {refusal}", status="503")
        raise InferenceServerException(msg="Failed to process the request(s) for model 'broken': stub is dead",
                                       status="500")

    monkeypatch.setattr(triton, "probe_inference", probe)
    assert healthcheck.main(["--state-dir", str(state_dir), "--timeout", "30"]) == 1
    output = capsys.readouterr()
    assert "busy: busy (" in output.out
    assert "unhealthy: broken: inference failed" in output.err
    assert "busy:" not in output.err
    assert "1 failure(s)" in output.err
