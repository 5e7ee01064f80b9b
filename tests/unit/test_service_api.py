"""The service's JSON API in process (no Triton: everything here is decided before a server is called): shapes,
statuses and codes, the body limit, and hostile input that must never break the service or its store."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the [service] extra (Python 3.11+) is not installed")
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capability import CapabilityLayer
from capability.service.app import ServiceConfig, create_app
from capability.service.auth import FailedAttempts
from capability.store import STORE_FILE
from capability.tokens import Tokens

SERVER = "http://127.0.0.1:9"  # never registered: a request that passes every check ends at server_not_registered


class Api:
    def __init__(self, client: TestClient, layer: CapabilityLayer) -> None:
        self.client = client
        self.layer = layer
        self.authority = layer.create_authority("ops").id
        self.tokens = Tokens(layer.store)
        self.alice = self.tokens.issue("ops", "alice", 3600).token
        self.capability = layer.mint("ops", self.authority, {"server_url": SERVER, "default_model": "tiny-sd15",
                                                             "max_width": 512}).give("alice").id

    def call(self, method: str, path: str, token: str | None = None, **kwargs: Any) -> Any:
        headers = kwargs.pop("headers", {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return self.client.request(method, path, headers=headers, **kwargs)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    with CapabilityLayer(tmp_path, store=f"sqlite://{tmp_path / STORE_FILE}") as layer:
        # No back-off here: the fuzzing below fails authentication on purpose, many times.
        app = create_app(layer, ServiceConfig(max_body_bytes=4096), failures=FailedAttempts(clock=lambda: 0.0))
        with TestClient(app) as client:
            yield Api(client, layer)


def assert_problem(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == status
    assert body["code"] == code, body
    assert isinstance(body["message"], str)
    assert body["message"]
    return dict(body)


def test_the_capability_verbs_answer_as_the_layer_does(api: Api) -> None:
    assert api.call("GET", "/v1/me", api.alice).json() == {"entity": "alice"}
    listed = api.call("GET", "/v1/capabilities", api.alice).json()["capabilities"]
    assert [item["id"] for item in listed] == [api.capability]
    child = api.call("POST", f"/v1/capabilities/{api.capability}/delegate", api.alice,
                     json={"max_width": 256, "expires_in": 60})
    assert child.status_code == 201, child.text
    assert child.json()["params"]["max_width"] == 256
    assert child.json()["expires_at"] is not None
    wider = api.call("POST", f"/v1/capabilities/{child.json()['id']}/delegate", api.alice, json={"max_width": 1024})
    assert "max_width=1024 is wider than the parent's 256" in assert_problem(wider, 400, "invalid_params")["message"]
    given = api.call("POST", f"/v1/capabilities/{child.json()['id']}/give", api.alice, json={"to": "bob"})
    assert given.json()["owner"] == "bob"
    # Given away: to alice it is now as unknown as a made-up id.
    gone = api.call("GET", f"/v1/capabilities/{child.json()['id']}", api.alice)
    made_up = api.call("GET", "/v1/capabilities/cap_madeup", api.alice)
    assert assert_problem(gone, 404, "unknown_capability")["message"].replace(child.json()["id"], "X") == \
        assert_problem(made_up, 404, "unknown_capability")["message"].replace("cap_madeup", "X")
    revoked = api.call("POST", f"/v1/capabilities/{api.capability}/revoke", api.alice)
    assert revoked.json() == {"revoked": [api.capability, child.json()["id"]]}
    audit = api.call("GET", "/v1/audit", api.alice, params={"capability": api.capability}).json()["entries"]
    assert [(entry["entity"], entry["action"], entry["outcome"]) for entry in audit] == [
        ("ops", "mint", "ok"), ("ops", "give", "ok"), ("alice", "revoke", "ok")]


def test_an_admin_mints_over_http_and_others_are_denied(api: Api) -> None:
    admin = api.tokens.issue("ops", "ops", 60).token
    minted = api.call("POST", f"/v1/authorities/{api.authority}/mint", admin,
                      json={"server_url": SERVER, "default_model": "tiny-sdxl", "allowed_models": ["tiny-sdxl"]})
    assert minted.status_code == 201, minted.text
    assert minted.json()["params"]["allowed_models"] == ["tiny-sdxl"]
    refused = api.call("POST", f"/v1/authorities/{api.authority}/mint", api.alice,
                       json={"server_url": SERVER, "default_model": "m"})
    assert_problem(refused, 404, "unknown_capability")


@pytest.mark.parametrize(("options", "status", "code", "fragment"), [
    ({"width": 5000}, 400, "invalid_option", "width=5000 is invalid: must be between 8 and 4096"),
    ({"width": 100}, 400, "invalid_option", "width=100 is invalid: must be a positive multiple of 8"),
    ({"widht": 64}, 400, "invalid_option", "did you mean 'width'?"),
    ({"guidanceScale": "7"}, 400, "invalid_option", "guidanceScale='7' is invalid: must be a number"),
    ({"width": 1024, "height": 64}, 403, "denied", "width=1024 exceeds max_width=512"),
    ({"width": 64, "height": 64}, 500, "server_not_registered", "no inference key"),
])
def test_text_to_image_refusals_have_their_status_code_and_the_layers_message(
        api: Api, options: dict[str, Any], status: int, code: str, fragment: str) -> None:
    response = api.call("POST", f"/v1/capabilities/{api.capability}/text-to-image", api.alice,
                        json={"prompt": "a cat", "options": options})
    body = assert_problem(response, status, code)
    assert fragment in body["message"]
    if code == "invalid_option":
        assert body["option"] in ("width", "widht", "guidanceScale")


@pytest.mark.parametrize(("body", "fragment"), [
    (b"{", "the body is not valid JSON"),
    (b"[1]", "it must be a JSON object"),
    (b'{"options": {}}', "prompt is required"),
    (b'{"prompt": 5}', "prompt=5 is invalid"),
    (b'{"prompt": "x", "seed": 1}', "seed is not a field of this request"),
    (b'{"prompt": "x", "options": [1]}', "options=[1] is invalid"),
])
def test_a_body_of_the_wrong_shape_is_an_invalid_request_naming_the_field(api: Api, body: bytes,
                                                                          fragment: str) -> None:
    response = api.call("POST", f"/v1/capabilities/{api.capability}/text-to-image", api.alice, content=body,
                        headers={"Content-Type": "application/json"})
    assert fragment in assert_problem(response, 400, "invalid_request")["message"]


def test_bodies_too_large_or_not_json_are_refused_unread(api: Api) -> None:
    path = f"/v1/capabilities/{api.capability}/text-to-image"
    large = api.call("POST", path, api.alice, content=b"x" * 5000, headers={"Content-Type": "application/json"})
    assert "larger than 4096 bytes" in assert_problem(large, 413, "body_too_large")["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: refused as the body grows past the limit
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"y" * 1000

    streamed = api.call("POST", path, api.alice, content=chunks(), headers={"Content-Type": "application/json"})
    assert_problem(streamed, 413, "body_too_large")
    text = api.call("POST", path, api.alice, content=b'{"prompt": "x"}', headers={"Content-Type": "text/plain"})
    assert "'text/plain'" in assert_problem(text, 415, "unsupported_media_type")["message"]


def test_unknown_paths_and_methods_and_missing_tokens(api: Api) -> None:
    assert_problem(api.call("GET", "/v2/nothing", api.alice), 404, "not_found")
    assert_problem(api.call("DELETE", "/v1/me", api.alice), 405, "method_not_allowed")
    missing = api.call("GET", "/v1/me")
    assert_problem(missing, 401, "unauthenticated")
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert_problem(api.call("GET", "/v1/me", headers={"Authorization": "Basic eDp5"}), 401, "unauthenticated")
    assert_problem(api.call("DELETE", "/v1/generations/gen_x", api.alice), 404, "unknown_generation")


def test_the_back_off_answers_429_with_retry_after(tmp_path: Path) -> None:
    with CapabilityLayer(tmp_path, store=f"sqlite://{tmp_path / STORE_FILE}") as layer, \
            TestClient(create_app(layer, failures=FailedAttempts(clock=lambda: 50.0))) as client:
        bad = {"Authorization": "Bearer tok_0123456789abcdef_" + "A" * 43}
        statuses = [client.get("/v1/me", headers=bad).status_code for _ in range(7)]
        assert statuses == [401] * 5 + [401, 429]
        blocked = client.get("/v1/me", headers=bad)
        assert blocked.json()["code"] == "too_many_failed_authentications"
        assert blocked.headers["retry-after"] == "1"


def test_the_openapi_schema_documents_every_route_and_docs_work_offline(api: Api) -> None:
    schema = api.call("GET", "/openapi.json").json()
    assert {"/v1/capabilities/{capability_id}/text-to-image", "/v1/capabilities/{capability_id}/text-to-image/stream",
            "/v1/generations/{generation_id}", "/v1/capabilities/{capability_id}/delegate"} <= set(schema["paths"])
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    docs = api.call("GET", "/docs").text
    assert "/docs-assets/swagger-ui-bundle.js" in docs
    assert "cdn" not in docs.lower()
    assert api.call("GET", "/docs-assets/swagger-ui-bundle.js").status_code == 200
    page = api.call("GET", "/")
    assert "script-src 'self'" in page.headers["content-security-policy"]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12)
OPTION_NAMES = st.sampled_from(["width", "height", "numInferenceSteps", "guidanceScale", "negativePrompt", "seed",
                                "modelId"]) | st.text(max_size=20)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=JSON_VALUES, options=st.dictionaries(OPTION_NAMES, JSON_VALUES, max_size=5) | JSON_VALUES,
       extra=st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=2))
def test_hostile_generation_bodies_get_a_documented_answer_and_the_service_keeps_serving(
        api: Api, prompt: Any, options: Any, extra: dict[str, Any]) -> None:
    body = {"prompt": prompt, "options": options, **extra}
    response = api.call("POST", f"/v1/capabilities/{api.capability}/text-to-image", api.alice,
                        content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    answer = response.json()
    allowed = {(400, "invalid_request"), (400, "invalid_option"), (403, "denied"), (413, "body_too_large"),
               (500, "server_not_registered")}
    assert (response.status_code, answer.get("code")) in allowed, answer
    assert answer["status"] == response.status_code
    assert len(answer["message"]) < 2000  # values are described, never echoed whole
    assert api.call("GET", "/v1/me", api.alice).json() == {"entity": "alice"}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(restrictions=st.dictionaries(st.sampled_from(["max_width", "max_height", "max_steps", "max_concurrent",
                                                     "allowed_models", "default_model", "expires_in", "server_url"])
                                    | st.text(max_size=12), JSON_VALUES, max_size=4))
def test_hostile_delegations_never_widen_and_never_break_the_store(api: Api, restrictions: dict[str, Any]) -> None:
    response = api.call("POST", f"/v1/capabilities/{api.capability}/delegate", api.alice,
                        content=json.dumps(restrictions).encode(), headers={"Content-Type": "application/json"})
    if response.status_code == 201:
        child = response.json()["params"]
        assert child["max_width"] <= 512
        assert child["server_url"] == SERVER
    else:
        assert (response.status_code, response.json()["code"]) in {(400, "invalid_request"), (400, "invalid_params")}
    assert api.call("GET", f"/v1/capabilities/{api.capability}", api.alice).status_code == 200


def test_the_listening_socket_says_tcp_so_that_asyncio_turns_nagle_off() -> None:
    """asyncio sets TCP_NODELAY on a server's connections only when the listening socket's protocol is TCP;
    without it each answer waited ~40 ms for the client's delayed acknowledgement."""
    import socket

    from capability.service.server import listening_socket

    with listening_socket("127.0.0.1", 0) as listener:
        assert listener.proto == socket.IPPROTO_TCP
        assert listener.getsockname()[0] == "127.0.0.1"
    with listening_socket("127.0.0.1", 0) as taken:
        taken.listen()
        with pytest.raises(OSError, match=r"cannot listen on 127\.0\.0\.1:\d+: "):
            listening_socket("127.0.0.1", taken.getsockname()[1])


def test_readiness_follows_the_store_down_and_back_while_liveness_stays(tmp_path: Path) -> None:
    """A database that dies and comes back: the instance leaves the rotation (503 with its code) and rejoins, and
    requests meanwhile get store_unavailable, never an internal error."""
    from capability.postgres_store import PostgresStore
    from workbench.postgres import postgres_server
    from workbench.waiting import wait_until

    with postgres_server() as server, \
            CapabilityLayer(tmp_path, store=PostgresStore(server.database(), pool_timeout_s=2)) as layer, \
            TestClient(create_app(layer, failures=FailedAttempts(clock=lambda: 0.0))) as client:
        # (the server is this test's own: it stops it)
        layer.create_authority("ops")
        token = Tokens(layer.store).issue("ops", "alice", 3600).token
        assert client.get("/readyz").status_code == 200
        server.stop()
        down = client.get("/readyz")
        assert_problem(down, 503, "store_unavailable")
        assert down.headers["retry-after"] == "1"
        assert client.get("/healthz").status_code == 200
        assert_problem(client.get("/v1/me", headers={"Authorization": f"Bearer {token}"}), 503, "store_unavailable")
        server.start()
        # The pool reconnects in the background, with back-off: ready again within a bounded time.
        wait_until(lambda: client.get("/readyz").status_code == 200, 60, "readiness after the database came back")
        assert client.get("/v1/me", headers={"Authorization": f"Bearer {token}"}).json() == {"entity": "alice"}


def test_an_event_streams_error_carries_its_retry_after_in_the_body() -> None:
    from capability.errors import ServerBusyError
    from capability.service.errors import error_body

    busy = ServerBusyError("http://127.0.0.1:8000 is busy: the queue is full; retry later")
    assert error_body(busy, with_retry_after=True) == {
        "status": 503, "code": "server_busy", "message": str(busy), "retryAfterS": 1}
    assert "retryAfterS" not in error_body(busy)  # a JSON answer has the Retry-After header instead


@pytest.mark.parametrize("query", ["since=nan", "until=inf", "since=-inf", "limit=0", "limit=abc"])
def test_audit_filters_that_are_not_finite_numbers_are_refused(api: Api, query: str) -> None:
    name = query.split("=", maxsplit=1)[0]
    body = assert_problem(api.call("GET", f"/v1/audit?{query}", api.alice), 400, "invalid_request")
    assert body["message"].startswith(f"query.{name}=")
