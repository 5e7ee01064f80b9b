"""The capability service as a real process in front of the real tritonserver: the seed's examples over HTTP,
progress as server-sent events, cancellation, errors with their statuses, a clean stop, a bounded load."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from capability import CapabilityLayer
from capability.servers import ServerKeys
from capability.tokens import Tokens
from inference_client.state import INFER_KEY_FILE
from tests.integration.conftest import ServiceUnderTest
from workbench.postgres import PostgresServer
from workbench.service import EventStream, ServiceProcess
from workbench.waiting import wait_until

# Long enough to be caught in the middle (the tiny models allow at most 100 steps), short enough for a test.
LONG_GENERATION = {"width": 512, "height": 512, "numInferenceSteps": 100}
README = Path(__file__).resolve().parents[2] / "README.md"


def readme_service_lines() -> str:
    """The README's shell lines for the service, without those that start it and issue the token (the test has
    its own service and token): the rest runs as a user would paste it."""
    section = README.read_text(encoding="utf-8").split("## Over HTTP", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    skipped = ("python -m capability serve", "SERVICE=", "TOKEN=")
    return "\n".join(line for line in block.splitlines() if not line.startswith(skipped))


# Records each curl call's arguments (one JSON list per line in $CURL_CALLS), then makes it.
RECORDING_CURL = """curl() {
  python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> "$CURL_CALLS"
  command curl "$@"
}
"""


def generate(service: ServiceUnderTest, token: str, capability: str, prompt: str,
             options: dict[str, Any] | None = None) -> tuple[int, dict[str, str], Any]:
    return service.process.request("POST", f"/v1/capabilities/{capability}/text-to-image", token,
                                   {"prompt": prompt, "options": options or {}})


def slot_is_free(service: ServiceUnderTest, token: str, capability: str) -> bool:
    status, _, body = generate(service, token, capability, "a blue sphere",
                               {"width": 64, "height": 64, "numInferenceSteps": 1, "seed": 1})
    assert status in (200, 429), body
    return status == 200


def test_the_readmes_curl_lines_run_the_seed_examples_with_the_python_apis_images(
        capability_service: ServiceUnderTest, tmp_path: Path) -> None:
    environment = {**os.environ, "SERVICE": capability_service.url, "TOKEN": capability_service.token_for("alice"),
                   "CAP": capability_service.mint("alice", default_model="tiny-sd15"),
                   "RESTRICTED": capability_service.mint("alice", default_model="tiny-sdxl",
                                                         allowed_models=["tiny-sdxl", "tiny-sd15"]),
                   "CURL_CALLS": str(tmp_path / "curl-calls.jsonl")}
    lines = readme_service_lines()
    subprocess.run(["bash", "-euo", "pipefail", "-c", RECORDING_CURL + lines], cwd=tmp_path, env=environment,
                   check=True, timeout=900)
    calls = [json.loads(line) for line in (tmp_path / "curl-calls.jsonl").read_text().splitlines()]
    outputs = re.findall(r"> (\w+\.json)", lines)
    assert outputs == ["sunset.json", "cityscape.json", "portrait.json", "restricted.json", "refused.json"]
    assert len(calls) == len(outputs)
    with Image.open(tmp_path / "sunset.png") as sunset:
        assert sunset.format == "PNG"
    for arguments, output in zip(calls, outputs, strict=True):
        body = json.loads(arguments[arguments.index("-d") + 1])
        answer = json.loads((tmp_path / output).read_text())
        url = next(argument for argument in arguments if argument.startswith("http"))
        capability = environment["RESTRICTED"] if environment["RESTRICTED"] in url else environment["CAP"]
        if output == "refused.json":
            assert answer["code"] == "denied", answer
            assert answer["status"] == 403
            assert "model 'tiny-flux' is not allowed" in answer["message"]
            continue
        # The Python API, given the seed the service reports, draws the very same image.
        options = {**body.get("options", {}), "seed": answer["seed"]}
        model = answer["model"]
        assert model == body.get("options", {}).get("modelId", "tiny-sdxl" if capability != environment["CAP"]
                                                     else "tiny-sd15")
        assert answer == capability_service.reference(body["prompt"], {**options, "modelId": model}), output
        with Image.open(io.BytesIO(base64.b64decode(answer["image"]))) as image:
            assert image.format == "PNG"
            assert image.size == (answer["width"], answer["height"])
    assert json.loads((tmp_path / "restricted.json").read_text())["model"] == "tiny-sdxl"


def test_progress_arrives_as_server_sent_events_and_ends_with_the_same_result(
        capability_service: ServiceUnderTest) -> None:
    token = capability_service.token_for("carol")
    capability = capability_service.mint("carol", default_model="tiny-sd15")
    options = {"width": 64, "height": 64, "numInferenceSteps": 4, "seed": 5}
    stream = EventStream(capability_service.url, f"/v1/capabilities/{capability}/text-to-image/stream", token,
                         {"prompt": "a green pyramid", "options": options})
    try:
        assert stream.status == 200
        assert stream.response.getheader("Content-Type", "").startswith("text/event-stream")
        events = []
        while (event := stream.next_event())[0]:
            events.append(event)
    finally:
        stream.close()
    names = [name for name, _ in events]
    assert names[0] == "started", names
    assert names[-1] == "result", names
    assert events[0][1]["generation"].startswith("gen_")
    progress = [data for name, data in events if name == "progress"]
    total = progress[-1]["steps"]
    assert total >= 4  # the scheduler's passes: SD1.5's PNDM makes one more than asked
    assert [data["stepsDone"] for data in progress] == list(range(1, total + 1))
    assert {data["steps"] for data in progress} == {total}
    status, _, plain = generate(capability_service, token, capability, "a green pyramid", options)
    assert status == 200
    assert events[-1][1] == plain


def test_a_refused_stream_is_an_ordinary_json_error_with_its_status(capability_service: ServiceUnderTest) -> None:
    token = capability_service.token_for("dave")
    capability = capability_service.mint("dave", default_model="tiny-sd15", max_width=128)
    stream = EventStream(capability_service.url, f"/v1/capabilities/{capability}/text-to-image/stream", token,
                         {"prompt": "a cat", "options": {"width": 256, "height": 64}})
    try:
        assert stream.status == 403
        body = stream.error()
    finally:
        stream.close()
    assert body["code"] == "denied"
    assert "width=256 exceeds max_width=128" in body["message"]


@pytest.mark.parametrize("how", ["delete", "close"])
def test_a_cancelled_stream_stops_on_the_server_and_frees_the_slot(capability_service: ServiceUnderTest,
                                                                  how: str) -> None:
    token = capability_service.token_for(f"erin-{how}")
    capability = capability_service.mint(f"erin-{how}", default_model="tiny-sd15", max_concurrent=1)
    stream = EventStream(capability_service.url, f"/v1/capabilities/{capability}/text-to-image/stream", token,
                         {"prompt": "a long walk", "options": LONG_GENERATION})
    try:
        assert stream.status == 200
        started = stream.next_event()
        assert started[0] == "started"
        assert stream.next_event()[0] == "progress"
        # The one slot is held: a second generation is refused while the first runs.
        status, headers, busy = generate(capability_service, token, capability, "another", {"width": 64,
                                                                                          "height": 64})
        assert (status, busy["code"]) == (429, "concurrency_limit")
        assert headers["retry-after"] == "1"
        if how == "delete":
            generation = started[1]["generation"]
            other = capability_service.token_for("mallory")
            status, _, body = capability_service.process.request("DELETE", f"/v1/generations/{generation}", other)
            assert (status, body["code"]) == (404, "unknown_generation")  # not mallory's to cancel
            status, _, body = capability_service.process.request("DELETE", f"/v1/generations/{generation}", token)
            assert (status, body) == (202, {"cancelled": generation})
            while (event := stream.next_event())[0] == "progress":
                pass
            assert event[0] == "error"
            assert event[1]["code"] == "cancelled"
    finally:
        stream.close()
    wait_until(lambda: slot_is_free(capability_service, token, capability), 60, "the slot freed by the cancel")
    entries = capability_service.layer.capabilities.audit_entries(f"erin-{how}", capability_id=capability,
                                                                  action="generate")
    outcomes = [entry["outcome"] for entry in entries]
    # Refusals while the slot was held (the one above, and the polls), then the cancel, then the poll that got in.
    assert outcomes[-2:] == ["cancelled", "ok"], outcomes
    assert set(outcomes[:-2]) == {"denied"}, outcomes


def test_authentication_errors_name_what_is_wrong_and_never_echo_the_token(
        capability_service: ServiceUnderTest) -> None:
    status, headers, body = capability_service.process.request("GET", "/v1/me")
    assert (status, body["code"]) == (401, "unauthenticated")
    assert headers["www-authenticate"].startswith("Bearer")
    token = capability_service.token_for("frank")
    assert capability_service.process.request("GET", "/v1/me", token)[2] == {"entity": "frank"}
    revoked = token.split("_")[1]
    capability_service.tokens.revoke(ServiceUnderTest.ADMIN, revoked)
    status, _, body = capability_service.process.request("GET", "/v1/me", token)
    assert (status, body["message"]) == (401, f"token {revoked} is revoked")
    assert token not in capability_service.process.log()


def test_a_bounded_load_through_the_service_loses_nothing_and_the_audit_is_complete(
        capability_service: ServiceUnderTest) -> None:
    token = capability_service.token_for("grace")
    capability = capability_service.mint("grace", default_model="tiny-sd15", max_concurrent=8)
    requests = 24

    def one(index: int) -> tuple[int, Any]:
        status, _, body = generate(capability_service, token, capability, f"load {index}",
                                   {"width": 64, "height": 64, "numInferenceSteps": 2, "seed": index})
        return status, body

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(requests)))
    assert [status for status, _ in answers] == [200] * requests, [body for status, body in answers if status != 200]
    assert sorted(body["seed"] for _, body in answers) == list(range(requests))
    entries = capability_service.layer.capabilities.audit_entries("grace", capability_id=capability,
                                                                  action="generate")
    assert [entry["outcome"] for entry in entries] == ["ok"] * requests


def test_sigterm_during_a_stream_exits_0_and_frees_the_slot(capability_service: ServiceUnderTest,
                                                           tmp_path: Path) -> None:
    server = capability_service.server
    token = capability_service.token_for("heidi")
    capability = capability_service.mint("heidi", default_model="tiny-sd15", max_concurrent=1)
    process = ServiceProcess(server.options.state_dir, tmp_path / "service.log",
                             extra_arguments=("--graceful-seconds", "1")).start()
    try:
        with EventStream(process.url, f"/v1/capabilities/{capability}/text-to-image/stream", token,
                         {"prompt": "a long walk", "options": LONG_GENERATION}) as stream:
            assert stream.next_event()[0] == "started"
            assert stream.next_event()[0] == "progress"
            process.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            assert process.stop() == 0, process.log()
    finally:
        process.kill()
    assert slot_is_free(capability_service, token, capability)
    entries = capability_service.layer.capabilities.audit_entries("heidi", capability_id=capability,
                                                                  action="generate")
    assert entries[0]["outcome"] == "cancelled"


def test_a_delete_that_reaches_another_instance_still_cancels_the_generation(
        capability_service: ServiceUnderTest, postgres: PostgresServer, tmp_path: Path) -> None:
    """Two instances on one PostgreSQL store, as behind a load balancer: the stream on one, its DELETE on the other.
    The other instance asks them all (LISTEN/NOTIFY); the one that runs it cancels it and says so."""
    server = capability_service.server
    store_url = postgres.database()
    with CapabilityLayer(tmp_path, store=store_url) as layer:
        ServerKeys(layer.store, None).register(server.url, server.options.state_dir / INFER_KEY_FILE,
                                                grpc_address=f"127.0.0.1:{server.options.grpc_port}")
        authority = layer.create_authority("ops").id
        capability = layer.mint("ops", authority, {"server_url": server.url, "default_model": "tiny-sd15",
                                                   "max_concurrent": 1}).give("ivan").id
        tokens = Tokens(layer.store)
        token, mallory = tokens.issue("ops", "ivan", 600).token, tokens.issue("ops", "mallory", 600).token
        first = ServiceProcess(tmp_path, tmp_path / "first.log", store=store_url).start()
        second = ServiceProcess(tmp_path, tmp_path / "second.log", store=store_url).start()
        try:
            with EventStream(first.url, f"/v1/capabilities/{capability}/text-to-image/stream", token,
                             {"prompt": "a long walk", "options": LONG_GENERATION}) as stream:
                started = stream.next_event()
                assert started[0] == "started"
                generation = started[1]["generation"]
                status, _, body = second.request("DELETE", f"/v1/generations/{generation}", mallory)
                assert (status, body["code"]) == (404, "unknown_generation")  # not mallory's, on any instance
                assert "on any instance" in body["message"]
                status, _, body = second.request("DELETE", f"/v1/generations/{generation}", token)
                assert (status, body) == (202, {"cancelled": generation}), (first.log(), second.log())
                while (event := stream.next_event())[0] == "progress":
                    pass
                assert event[0] == "error"
                assert event[1]["code"] == "cancelled"
            assert second.request("DELETE", "/v1/generations/gen_unknown", token)[0] == 404
        finally:
            assert first.stop() == 0, first.log()
            assert second.stop() == 0, second.log()
        outcomes = [entry["outcome"] for entry in layer.capabilities.audit_entries("ivan", capability_id=capability,
                                                                                    action="generate")]
        assert outcomes == ["cancelled"]
