"""The HTTP API over the capability layer (docs/service.md is its contract): an ASGI app built by FastAPI.

Nothing here decides who may do what: every request is authenticated (:mod:`.auth`), then handed to the same
:class:`~capability.CapabilityLayer` calls as the Python API, with the same checks, audit and messages. The layer
blocks (store round trips, a generation of seconds), so every call runs in a worker thread and the event loop
only moves bytes: a generation never holds up another request.

No ``from __future__ import annotations`` here: FastAPI reads the routes' annotations at run time, and those that
name objects local to :func:`create_app` (the caller dependency) cannot be resolved from strings.
"""


import asyncio
import contextlib
import json
import logging
import math
import secrets
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from capability.errors import CapabilityError, InvalidParamsError, StoreError
from capability.layer import CapabilityLayer
from capability.servers import Cancellation
from capability.tokens import Tokens
from inference_client.contract import Progress, describe_value

from .auth import Authenticator, FailedAttempts, TooManyFailuresError
from .errors import error_body, error_response, problem
from .relay import CancelRelay

logger = logging.getLogger(__name__)

API_VERSION = "1"
DEFAULT_MAX_BODY_BYTES = 64 * 1024
"""Twice the longest prompts (4 KiB each) and every option fit many times over; anything larger is refused unread."""
KEEP_ALIVE_S = 15.0
"""A comment line on a quiet event stream this often, so that proxies do not close it as idle."""
Returned = TypeVar("Returned")


@dataclass(frozen=True)
class ServiceConfig:
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    trusted_header: str | None = None
    trusted_proxies: tuple[str, ...] = ()
    forwarded_from: tuple[str, ...] = ()
    """Proxies whose X-Forwarded-For names the client (for the back-off on failed authentications)."""
    max_generations: int = 64
    """Generations running at once in this process (each holds a thread while it waits for the server); more wait
    here, without a thread, in arrival order."""
    max_threads: int = 64
    """Threads for everything else: store reads and writes, authentication."""
    keep_alive_s: float = KEEP_ALIVE_S


# --- request bodies: their shape only; the layer checks the values and says what is wrong --------------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextToImageRequest(_Body):
    prompt: str = Field(description="What to draw", examples=["a beautiful sunset over mountains"])
    options: dict[str, Any] | None = Field(
        default=None, description="width, height, numInferenceSteps, guidanceScale, negativePrompt, seed, modelId",
        examples=[{"width": 768, "height": 512, "numInferenceSteps": 30, "guidanceScale": 7.5, "seed": 42}])


class _Limits(_Body):
    allowed_models: list[str] | None = None
    max_concurrent: int | None = None
    max_width: int | None = None
    max_height: int | None = None
    max_steps: int | None = None
    expires_in: float | None = Field(default=None, description="seconds from now, by the store's clock")


class MintRequest(_Limits):
    server_url: str = Field(examples=["http://127.0.0.1:8000"])
    default_model: str = Field(examples=["stabilityai/stable-diffusion-2-1"])


class DelegateRequest(_Limits):
    default_model: str | None = None


class GiveRequest(_Body):
    to: str = Field(description="the entity that will hold the capability", examples=["bob"])


# --- the app -------------------------------------------------------------------------------------------------

def create_app(layer: CapabilityLayer, config: ServiceConfig | None = None, *,  # noqa: PLR0915 - the routes
               failures: FailedAttempts | None = None) -> FastAPI:
    """The service's ASGI app over ``layer`` (which the caller closes)."""
    config = config or ServiceConfig()
    authenticator = Authenticator(Tokens(layer.store), trusted_header=config.trusted_header,
                                  trusted_proxies=config.trusted_proxies, forwarded_from=config.forwarded_from,
                                  failures=failures)
    generations = RunningGenerations()
    limiters: dict[str, anyio.CapacityLimiter] = {}
    # Instances sharing a PostgreSQL store pass cancellations of each other's generations along.
    relay = CancelRelay(layer.store, generations.cancel) if layer.store.dialect == "postgresql" else None

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        limiters["generations"] = anyio.CapacityLimiter(config.max_generations)
        limiters["other"] = anyio.CapacityLimiter(config.max_threads)
        if relay is not None:
            relay.start()
        yield
        # Streams still open when the server stops: stop their work on the Triton server and free their slots.
        await generations.cancel_all_and_wait()
        if relay is not None:
            await anyio.to_thread.run_sync(relay.stop)

    app = FastAPI(
        title="Capability service", version=API_VERSION, lifespan=lifespan, docs_url=None, redoc_url=None,
        description="diffusers.generate capabilities over HTTP: text-to-image on Triton, with delegation, "
                    "revocation, limits and audit. Authenticate with `Authorization: Bearer <token>`.",
    )
    app.add_middleware(BodyLimit, max_body_bytes=config.max_body_bytes)
    _add_error_handlers(app)
    _add_pages(app)

    async def blocking(call: Callable[..., Returned], *args: Any) -> Returned:
        return await anyio.to_thread.run_sync(call, *args, limiter=limiters["other"])

    bearer = HTTPBearer(auto_error=False, description="a token from python -m capability token issue")

    async def caller(request: Request,
                     _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)] = None) -> str:
        peer = request.client.host if request.client else "unknown"
        trusted = request.headers.get(config.trusted_header) if config.trusted_header else None
        return await blocking(authenticator.authenticate, peer, request.headers.get("authorization"), trusted,
                              request.headers.get("x-forwarded-for"))

    Caller = Annotated[str, Depends(caller)]  # noqa: N806 - a type alias

    @app.get("/healthz", tags=["operations"], summary="Liveness: the process serves")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], summary="Readiness: the store answers",
             responses={503: {"description": "the store cannot be reached"}})
    async def readyz() -> Response:
        try:
            # A real statement: SQLite's clock is the host's, so asking the time alone would read nothing.
            await blocking(lambda: layer.store.read().execute("SELECT id FROM tokens LIMIT 1").fetchall())
        except StoreError as error:
            return problem(503, "store_unavailable", str(error), retry_after_s=1)
        return JSONResponse({"status": "ready"})

    @app.get("/v1/me", tags=["capabilities"], summary="Who the token speaks for")
    async def me(entity: Caller) -> dict[str, str]:
        return {"entity": entity}

    @app.get("/v1/capabilities", tags=["capabilities"], summary="The capabilities the caller holds")
    async def list_capabilities(entity: Caller) -> dict[str, Any]:
        owned = await blocking(layer.capabilities.owned, entity)
        return {"capabilities": [capability.as_dict() for capability in owned]}

    @app.get("/v1/capabilities/{capability_id}", tags=["capabilities"], summary="One capability the caller holds")
    async def show(capability_id: str, entity: Caller) -> dict[str, Any]:
        shown = await blocking(layer.capabilities.show, entity, capability_id)
        return shown.as_dict()

    @app.post("/v1/authorities/{authority_id}/mint", tags=["capabilities"], status_code=201,
              summary="Mint a diffusers.generate capability (the authority's owner)")
    async def mint(authority_id: str, body: MintRequest, entity: Caller) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            params = _with_expiry(body.model_dump(exclude_unset=True), layer)
            return layer.capabilities.mint(entity, authority_id, params).as_dict()
        return await blocking(run)

    @app.post("/v1/capabilities/{capability_id}/delegate", tags=["capabilities"], status_code=201,
              summary="A narrower capability, held by the caller (give it on after)")
    async def delegate(capability_id: str, body: DelegateRequest, entity: Caller) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            restrictions = _with_expiry(body.model_dump(exclude_unset=True), layer)
            return layer.capabilities.delegate(entity, capability_id, restrictions).as_dict()
        return await blocking(run)

    @app.post("/v1/capabilities/{capability_id}/give", tags=["capabilities"],
              summary="Move the capability to another entity")
    async def give(capability_id: str, body: GiveRequest, entity: Caller) -> dict[str, Any]:
        given = await blocking(layer.capabilities.give, entity, capability_id, body.to)
        return given.as_dict()

    @app.post("/v1/capabilities/{capability_id}/revoke", tags=["capabilities"],
              summary="Revoke the capability and everything delegated from it")
    async def revoke(capability_id: str, entity: Caller) -> dict[str, Any]:
        return {"revoked": await blocking(layer.capabilities.revoke, entity, capability_id)}

    @app.get("/v1/audit", tags=["capabilities"],
             summary="Audit entries of the caller's capabilities and of those below them, oldest first")
    async def audit(entity: Caller,  # noqa: PLR0917 - FastAPI takes query parameters as arguments
                    capability: Annotated[str | None, Query(description="one capability only")] = None,
                    actor: Annotated[str | None, Query(alias="entity", description="one acting entity only")] = None,
                    action: str | None = None, outcome: str | None = None,
                    since: Annotated[float | None, Query(description="Unix time, inclusive",
                                                         allow_inf_nan=False)] = None,
                    until: Annotated[float | None, Query(description="Unix time, exclusive",
                                                         allow_inf_nan=False)] = None,
                    limit: Annotated[int | None, Query(ge=1, le=10_000, description="the most recent N")] = None,
                    ) -> dict[str, Any]:
        entries = await blocking(lambda: layer.capabilities.audit_entries(
            entity, capability_id=capability, entity=actor, action=action, outcome=outcome, since=since,
            until=until, limit=limit))
        return {"entries": entries}

    @app.post("/v1/capabilities/{capability_id}/text-to-image", tags=["generation"],
              summary="textToImage: one image, as the seed's plugin returned it, plus its seed and model",
              responses={200: {"content": {"application/json": {"example": {
                  "image": "iVBORw0KGgo…", "width": 512, "height": 512, "format": "png", "seed": 42,
                  "model": "stabilityai/stable-diffusion-2-1"}}}}})
    async def text_to_image(capability_id: str, body: TextToImageRequest, entity: Caller) -> dict[str, Any]:
        handle = layer.handle(entity, capability_id)
        return await anyio.to_thread.run_sync(handle.text_to_image, body.prompt, body.options,
                                              limiter=limiters["generations"])

    @app.post("/v1/capabilities/{capability_id}/text-to-image/stream", tags=["generation"],
              summary="textToImage with progress, as server-sent events (started, progress…, result or error)",
              response_class=StreamingResponse,
              responses={200: {"content": {"text/event-stream": {}},
                               "description": "events: started, progress (repeated), then result or error"}})
    async def text_to_image_stream(capability_id: str, body: TextToImageRequest, entity: Caller) -> Response:
        generation = generations.start(layer, entity, capability_id, body, limiters["generations"])
        # Refusals of the layer itself (an option, a denial, a full budget) come before "accepted": they are answered
        # with their own status. From "accepted" on, the stream runs, and can be cancelled by its id while it waits
        # in the server's queue.
        first = await generation.next_event()
        if first.kind == "error":
            await generation.finished()
            if isinstance(first.value, CapabilityError):
                return error_response(first.value)
            raise first.value
        return StreamingResponse(generation.events(first, config.keep_alive_s), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @app.delete("/v1/generations/{generation_id}", tags=["generation"], status_code=202,
                summary="Cancel a running generation of the caller's: the server stops after its current step")
    async def cancel(generation_id: str, entity: Caller) -> Response:
        if not generations.cancel(entity, generation_id) and (
                relay is None or not await blocking(relay.ask, entity, generation_id)):
            where = "on any instance" if relay is not None else "here"
            return problem(404, "unknown_generation", f"no generation {describe_value(generation_id)} of "
                                                      f"{describe_value(entity)} is running {where}")
        return JSONResponse({"cancelled": generation_id}, status_code=202)

    return app


def _with_expiry(values: dict[str, Any], layer: CapabilityLayer) -> dict[str, Any]:
    """``expires_in`` (seconds from now) as the layer's ``expires_at``, from the store's clock."""
    expires_in = values.pop("expires_in", None)
    if expires_in is not None:
        if not math.isfinite(expires_in) or expires_in <= 0:
            raise InvalidParamsError(f"expires_in={describe_value(expires_in)} is invalid: must be a positive number "
                                     "of seconds")
        values["expires_at"] = layer.capabilities.now() + expires_in
    return values


# --- streaming generations -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Event:
    kind: str
    """``accepted`` (every check passed, the slot taken: the stream starts), ``progress``, ``result`` or
    ``error``."""
    value: Any


class StreamingGeneration:
    """One generation on the model's streaming variant, run in a worker thread; its events reach the event loop
    through a queue."""

    def __init__(self, identifier: str, entity: str) -> None:
        self.id = identifier
        self.entity = entity
        self.cancellation = Cancellation()
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Future[None] | None = None

    def run(self, layer: CapabilityLayer, capability_id: str, body: TextToImageRequest,
            limiter: anyio.CapacityLimiter) -> asyncio.Future[None]:
        """Start it in a worker thread; the future ends with it."""
        def push(event: Event) -> None:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)

        def work() -> None:
            try:
                result = layer.generator.text_to_image(
                    self.entity, capability_id, body.prompt, body.options, cancellation=self.cancellation,
                    on_progress=lambda progress: push(Event("progress", progress)),
                    on_accepted=lambda: push(Event("accepted", None)))
            except Exception as error:  # handed to the stream, which tells the client
                push(Event("error", error))
            else:
                push(Event("result", result))
            finally:
                layer.generator.release_thread_clients()

        self._task = asyncio.ensure_future(anyio.to_thread.run_sync(work, limiter=limiter))
        return self._task

    async def next_event(self) -> Event:
        return await self._events.get()

    async def finished(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    async def events(self, first: Event, keep_alive_s: float) -> AsyncIterator[str]:
        """The event stream; if it ends early (the client went away, the server stops), the generation is
        cancelled on the Triton server."""
        done = False
        try:
            yield _sse("started", {"generation": self.id})
            event: Event | None = first
            while True:
                if event is None:
                    yield ": keep-alive\n\n"
                elif event.kind == "accepted":
                    pass  # said by "started"
                elif event.kind == "progress":
                    yield _sse("progress", _progress(event.value))
                else:
                    done = True
                    if event.kind == "result":
                        yield _sse("result", event.value)
                    elif isinstance(event.value, CapabilityError):
                        yield _sse("error", error_body(event.value, with_retry_after=True))
                    else:
                        logger.error("generation %s failed", self.id, exc_info=event.value)
                        yield _sse("error", {"status": 500, "code": "internal", "message": "internal error"})
                    return
                try:
                    event = await asyncio.wait_for(self.next_event(), keep_alive_s)
                except asyncio.TimeoutError:
                    event = None
        finally:
            if not done:
                logger.info("generation %s: the stream ended early; cancelling it on the server", self.id)
                self.cancellation.cancel()


def _sse(event: str, data: Mapping[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _progress(progress: Progress) -> dict[str, Any]:
    return {"stepsDone": progress.steps_done, "steps": progress.steps, "elapsedS": round(progress.elapsed_s, 3)}


class RunningGenerations:
    """The streaming generations running in this process, by id: what ``DELETE /v1/generations/{id}`` finds."""

    def __init__(self) -> None:
        self._running: dict[str, StreamingGeneration] = {}
        self._lock = threading.Lock()

    def start(self, layer: CapabilityLayer, entity: str, capability_id: str, body: TextToImageRequest,
              limiter: anyio.CapacityLimiter) -> StreamingGeneration:
        generation = StreamingGeneration("gen_" + secrets.token_urlsafe(16), entity)
        with self._lock:
            self._running[generation.id] = generation
        generation.run(layer, capability_id, body, limiter).add_done_callback(lambda _: self._forget(generation.id))
        return generation

    def _forget(self, identifier: str) -> None:
        with self._lock:
            self._running.pop(identifier, None)

    def cancel(self, entity: str, identifier: str) -> bool:
        """Cancel ``entity``'s generation ``identifier``; False if there is none (or it is another's)."""
        with self._lock:
            generation = self._running.get(identifier)
        if generation is None or generation.entity != entity:
            return False
        generation.cancellation.cancel()
        return True

    async def cancel_all_and_wait(self) -> None:
        with self._lock:
            running = list(self._running.values())
        for generation in running:
            generation.cancellation.cancel()
        for generation in running:
            with contextlib.suppress(Exception):
                await generation.finished()


# --- limits, errors, pages -----------------------------------------------------------------------------------

class BodyTooLargeError(StarletteHTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes (--max-body-bytes)")


class BodyLimit:
    """Refuse a request body larger than the limit before reading it (by its Content-Length), or as soon as it
    grows past it (a body sent without a length); and a body that is not JSON, unread."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        has_body = (length is not None and length != b"0") or b"transfer-encoding" in headers
        media_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if has_body and media_type != b"application/json":
            await problem(415, "unsupported_media_type", f"the body must be JSON (Content-Type: application/json), "
                                                         f"not {describe_value(media_type.decode('latin-1'))}",
                          headers={"Connection": "close"})(scope, receive, send)
            return
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            response = problem(413, "body_too_large", str(BodyTooLargeError(self.max_body_bytes).detail),
                               headers={"Connection": "close"}) if length.isdigit() else \
                problem(400, "invalid_request", "the Content-Length header is not a number")
            await response(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLargeError(self.max_body_bytes)
            return message

        await self.app(scope, limited, send)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large", 415: "unsupported_media_type"}


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(CapabilityError)
    async def capability_error(_: Request, error: CapabilityError) -> Response:
        if isinstance(error, TooManyFailuresError):
            return problem(429, "too_many_failed_authentications", str(error),
                           retry_after_s=math.ceil(error.retry_after_s))
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> Response:
        return problem(400, "invalid_request", describe_validation_error(error))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> Response:
        code = _HTTP_CODES.get(error.status_code, f"http_{error.status_code}")
        message = str(error.detail) if error.status_code not in (404, 405) else {
            404: "no such path", 405: "this path does not take that method"}[error.status_code]
        return problem(error.status_code, code, message, headers=dict(error.headers or {}))

    @app.exception_handler(Exception)
    async def internal(_: Request, error: Exception) -> Response:
        logger.error("internal error", exc_info=error)
        return problem(500, "internal", "internal error: the service's log has the details")


def describe_validation_error(error: RequestValidationError) -> str:
    """The first problem of a request's shape, as the layer words its own: the field, the value and the rule."""
    first = error.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    kind = first.get("type", "")
    if kind == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
    if not location:
        if kind == "missing":
            return "the body is required: a JSON object"
        return f"the body is invalid: {first.get('msg')}; it must be a JSON object"
    field = ".".join(location)
    if kind == "missing":
        return f"{field} is required"
    if kind == "extra_forbidden":
        return f"{field} is not a field of this request"
    return f"{field}={describe_value(first.get('input'))} is invalid: {first.get('msg')}"


class RevalidatedStaticFiles(StaticFiles):
    """The page's files, revalidated on every load (ETag: a 304 when unchanged), so that after an upgrade a browser
    never pairs a new index.html with an old app.js."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers["Cache-Control"] = "no-cache"
        return response


def _add_pages(app: FastAPI) -> None:
    static = resources.files("capability.service") / "static"
    app.mount("/static", RevalidatedStaticFiles(directory=str(static)), name="static")
    try:  # Swagger UI's own files, as the fastapi-swagger package carries them (its code is not used)
        swagger = resources.files("fastapi_swagger") / "resources"
        app.mount("/docs-assets", StaticFiles(directory=str(swagger)), name="docs-assets")
        has_swagger = True
    except (ImportError, RuntimeError):  # pragma: no cover - a pinned dependency of the [service] extra
        has_swagger = False

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse((static / "index.html").read_text(encoding="utf-8"),
                            headers={"Cache-Control": "no-cache", "Content-Security-Policy": _PAGE_POLICY})

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        if not has_swagger:
            return HTMLResponse("<p>Swagger UI is not installed; the schema is at /openapi.json</p>")
        return get_swagger_ui_html(openapi_url="/openapi.json", title="Capability service",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")


# The page loads nothing from elsewhere and runs no inline script: a prompt or message shown in it cannot run code.
_PAGE_POLICY = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
