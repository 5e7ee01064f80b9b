"""textToImage option checks, made before anything reaches a server (no Triton)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from capability.capabilities import Capabilities
from capability.errors import DeniedError, InvalidOptionError
from capability.generation import check_grant, check_prompt, parse_options
from capability.sqlite_store import SQLiteStore
from capability.store import STORE_FILE


@pytest.mark.parametrize(
    ("options", "option", "rule"),
    [
        ({"widht": 512}, "widht", "did you mean 'width'"),
        ({"steps": 4}, "steps", "is not a textToImage option"),
        ({"width": 500}, "width", "positive multiple of 8"),
        ({"width": "512"}, "width", "must be an integer"),
        ({"height": 512.0}, "height", "must be an integer"),
        ({"height": True}, "height", "must be an integer"),
        ({"width": 8192}, "width", "between 8 and 4096"),
        ({"numInferenceSteps": 0}, "numInferenceSteps", "between 1 and 1000"),
        ({"guidanceScale": float("nan")}, "guidanceScale", "finite number"),
        ({"guidanceScale": float("inf")}, "guidanceScale", "finite number"),
        ({"guidanceScale": -1}, "guidanceScale", "between 0 and 100"),
        ({"guidanceScale": "7.5"}, "guidanceScale", "must be a number"),
        ({"seed": -1}, "seed", "between 0 and"),
        ({"seed": 2**63}, "seed", "between 0 and"),
        ({"negativePrompt": "a\x00b"}, "negativePrompt", "NUL"),
        ({"modelId": ""}, "modelId", "must be a model id"),
        ({"modelId": "m" * 5_000_000}, "modelId", "1 to 256 characters"),
        ({"modelId": "a\x00b"}, "modelId", "printable"),
    ],
)
def test_parse_options_names_option_value_and_rule_when_an_option_is_bad(
    options: dict[str, Any], option: str, rule: str
) -> None:
    with pytest.raises(InvalidOptionError, match=rule) as caught:
        parse_options(options)
    assert caught.value.option == option
    assert str(caught.value).startswith(f"{option}=")


def test_parse_options_keeps_the_seed_examples_options_when_they_are_valid() -> None:
    options = parse_options({"width": 768, "height": 512, "numInferenceSteps": 30, "guidanceScale": 7.5,
                             "negativePrompt": "blurry, low quality", "seed": 42})
    assert (options.width, options.height, options.steps, options.guidance_scale, options.seed) == (
        768, 512, 30, 7.5, 42)


@pytest.mark.parametrize(
    ("prompt", "rule"),
    [("", "visible text"), ("x" * 3_000_000, "at most 4096 bytes"), ("caf\udce9", "lone surrogate"),
     ("a\x00b", "NUL"), (b"bytes", "must be a string")],
)
def test_check_prompt_refuses_when_the_prompt_is_unusable(prompt: Any, rule: str) -> None:
    with pytest.raises(InvalidOptionError, match=rule):
        check_prompt(prompt)


def test_check_prompt_shows_a_size_not_the_text_when_the_prompt_is_megabytes(tmp_path: Path) -> None:
    with pytest.raises(InvalidOptionError) as caught:
        check_prompt("secret " * 500_000)
    assert "secret" not in str(caught.value)


@pytest.fixture
def grant(tmp_path: Path) -> Any:
    capabilities = Capabilities(SQLiteStore(tmp_path / STORE_FILE))
    authority = capabilities.create_authority("admin").id
    capability = capabilities.mint("admin", authority, {
        "server_url": "http://127.0.0.1:8000", "default_model": "tiny-sd15",
        "allowed_models": ["tiny-sd15", "tiny-sdxl"], "max_width": 512, "max_height": 512, "max_steps": 8})
    return capabilities.authorize("admin", capability.id)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"width": 1024, "height": 256, "numInferenceSteps": 4}, "width=1024 exceeds max_width=512"),
        ({"width": 256, "height": 520, "numInferenceSteps": 4}, "height=520 exceeds max_height=512"),
        ({"width": 256, "height": 256, "numInferenceSteps": 9}, "numInferenceSteps=9 exceeds max_steps=8"),
        ({"height": 256, "numInferenceSteps": 4}, "width is required with capability"),
        ({"width": 256, "height": 256, "numInferenceSteps": 4, "modelId": "tiny-flux"},
         r"model 'tiny-flux' is not allowed .* \['tiny-sd15', 'tiny-sdxl'\]"),
    ],
)
def test_check_grant_refuses_options_beyond_the_capability(grant: Any, options: dict[str, Any], message: str) -> None:
    with pytest.raises(DeniedError, match=message):
        check_grant(grant, parse_options(options))


def test_check_grant_picks_the_default_model_when_none_is_asked_for(grant: Any) -> None:
    assert check_grant(grant, parse_options({"width": 256, "height": 256, "numInferenceSteps": 4})) == "tiny-sd15"


def test_server_keys_refuse_a_state_dir_others_can_write_when_looking_up_the_local_key(tmp_path: Path) -> None:
    from capability.errors import UnknownServerError
    from capability.servers import ServerKeys

    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "server.json").write_text(
        '{"url": "http://127.0.0.1:8000", "grpc_address": "127.0.0.1:8001", "models": ["tiny-sd15"]}')
    (state_dir / "infer-key").write_text("key\n")
    keys = ServerKeys(SQLiteStore(tmp_path / STORE_FILE), state_dir)
    state_dir.chmod(0o700)
    assert keys.key_for("http://127.0.0.1:8000") == "key"
    state_dir.chmod(0o777)
    with pytest.raises(UnknownServerError, match="must belong to this user and be writable by it alone"):
        keys.key_for("http://127.0.0.1:8000")


def test_capability_package_imports_neither_torch_nor_diffusers_when_embedded() -> None:
    import subprocess
    import sys

    probe = ("import sys, capability, capability.__main__; "
             "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("[request id: <id_unknown>] Exceeds maximum queue size", "the model's queue is full"),
        ("Request timeout expired", "waited in the model's queue past its timeout"),
    ],
)
def test_gateway_reports_busy_when_triton_refuses_for_its_queue(message: str, reason: str) -> None:
    InferenceServerException = pytest.importorskip("tritonclient.utils").InferenceServerException  # noqa: N806

    from capability.errors import GenerationError, ServerBusyError
    from capability.servers import TritonGateway

    class Keys:
        def key_for(self, _url: str) -> str:
            return "key"

    def refused(_client: Any, _headers: Any) -> None:
        raise InferenceServerException(msg=message, status="503")

    gateway = TritonGateway("http://127.0.0.1:8000", Keys())  # type: ignore[arg-type]
    gateway._client = object  # type: ignore[method-assign]
    with pytest.raises(ServerBusyError, match=f"http://127.0.0.1:8000 is busy: .*{reason}.*; retry later"):
        gateway._call(refused)
    with pytest.raises(GenerationError, match=r"failed the request \(500\): CUDA out of memory"):
        gateway._call(lambda _client, _headers: (_ for _ in ()).throw(
            InferenceServerException(msg="CUDA out of memory", status="500")))


@pytest.mark.parametrize(
    "failure",
    [
        # What Triton 2.51 answers for a model whose Python stub died (it does not restart the stub).
        ("InferenceServerException", "500", "Stub process 'tiny-sd15_0_0' is not healthy."),
        ("InferenceServerException", "503", "Server not ready"),
        ("InferenceServerException", None, "connection reset"),
        ("ConnectionRefusedError", None, "[Errno 111] Connection refused"),
        # geventhttpclient's error for a connection that the server closed (it killed) without an answer.
        ("HTTPException", None, "connection closed."),
    ],
)
def test_gateway_reports_a_crashed_or_restarting_server_as_temporarily_unavailable(
    failure: tuple[str, str | None, str],
) -> None:
    InferenceServerException = pytest.importorskip("tritonclient.utils").InferenceServerException  # noqa: N806
    import http.client

    from capability.errors import TemporarilyUnavailableError
    from capability.servers import TritonGateway

    kind, status, message = failure
    error: Exception
    if kind == "InferenceServerException":
        error = InferenceServerException(msg=message, status=status)
    elif kind == "ConnectionRefusedError":
        error = ConnectionRefusedError(111, "Connection refused")
    else:
        error = http.client.HTTPException(message)

    class Keys:
        def key_for(self, _url: str) -> str:
            return "key"

    class Client:
        closed = False

        def close(self) -> None:
            self.closed = True

    client = Client()
    gateway = TritonGateway("http://127.0.0.1:8000", Keys())  # type: ignore[arg-type]
    gateway._local.client = client
    with pytest.raises(TemporarilyUnavailableError, match=r"http://127.0.0.1:8000 is temporarily unavailable .*retry"):
        gateway._call(lambda _client, _headers: (_ for _ in ()).throw(error))
    assert client.closed  # its connection may be dead: the next call opens a new one
    assert gateway._local.client is None


def test_only_requests_with_a_seed_are_retried_while_the_server_is_temporarily_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from capability import generation
    from capability.errors import TemporarilyUnavailableError
    from capability.sqlite_store import SQLiteStore

    monkeypatch.setattr(generation, "_FIRST_RETRY_DELAY_S", 0.0)
    attempts: list[int] = []

    def down_twice() -> str:
        attempts.append(len(attempts))
        if len(attempts) <= 2:
            raise TemporarilyUnavailableError("restarting")
        return "image"

    patient = generation.TextToImage(SQLiteStore(tmp_path / "store.db"), None, retry_unavailable_s=60)
    assert patient._when_available(down_twice, retry=True) == "image"
    assert len(attempts) == 3
    attempts.clear()
    with pytest.raises(TemporarilyUnavailableError):
        patient._when_available(down_twice, retry=False)  # no seed: the caller decides
    assert len(attempts) == 1
    attempts.clear()
    impatient = generation.TextToImage(SQLiteStore(tmp_path / "store.db"), None, retry_unavailable_s=0)
    with pytest.raises(TemporarilyUnavailableError):
        impatient._when_available(down_twice, retry=True)
    assert len(attempts) == 1


def test_a_cancel_ends_the_wait_for_a_restarting_server_and_a_generation_cleans_up_its_thread(
    tmp_path: Path,
) -> None:
    from capability import generation
    from capability.errors import GenerationCancelledError, TemporarilyUnavailableError
    from capability.servers import Cancellation
    from capability.sqlite_store import SQLiteStore

    def down() -> str:
        raise TemporarilyUnavailableError("restarting")

    patient = generation.TextToImage(SQLiteStore(tmp_path / "store.db"), None, retry_unavailable_s=600)
    cancellation = Cancellation()
    cancellation.cancel()
    with pytest.raises(GenerationCancelledError, match="while waiting for the server to come back"):
        patient._when_available(down, retry=True, cancellation=cancellation)

    cleaned: list[str] = []
    finished = generation.Generation(lambda _: {"image": "…"}, cleanup=lambda: cleaned.append("closed"))
    assert finished.result(60) == {"image": "…"}
    assert cleaned == ["closed"]
