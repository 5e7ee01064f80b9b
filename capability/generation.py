"""``textToImage``: check everything, then one call to Triton, then a base64 PNG.

Every option is checked before the server is contacted: names, types, finite numbers, ranges, the smallest
size multiple of any family (8; SD3 and FLUX need 16, which their server enforces), prompt length and
encoding, and the capability's allowlist and limits. The concurrency slot is taken last, just before the call.
"""

from __future__ import annotations

import difflib
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from inference_client import contract
from inference_client.contract import DEFAULT_MAX_PROMPT_BYTES, MAX_SEED, Progress

from .capabilities import LEASE_SECONDS, Capabilities, Grant
from .errors import (
    CapabilityError,
    DeniedError,
    GenerationCancelledError,
    InvalidOptionError,
    RequestRefusedError,
    TemporarilyUnavailableError,
)
from .png import encode_png_base64
from .servers import Cancellation, ServerKeys, TritonGateway
from .store import Store

logger = logging.getLogger(__name__)

OPTION_NAMES = ("width", "height", "numInferenceSteps", "guidanceScale", "negativePrompt", "seed", "modelId")
MAX_MODEL_ID_LENGTH = 256
SIZE_MULTIPLE = 8
"""The smallest size multiple of any served family; the server applies its family's own (16 for SD3/FLUX)."""
MAX_SIDE = 4096
MAX_STEPS = 1000
MAX_GUIDANCE_SCALE = 100.0
MAX_PROMPT_BYTES = DEFAULT_MAX_PROMPT_BYTES
RETRY_UNAVAILABLE_S = 180.0
"""How long a seeded request waits for a restarting server: a restart reloads every model (minutes on a GPU)."""
_FIRST_RETRY_DELAY_S = 0.25
_MAX_RETRY_DELAY_S = 5.0
Result = TypeVar("Result")


@dataclass(frozen=True)
class Options:
    """Checked ``textToImage`` options; None leaves the choice to the model (or the capability's default)."""

    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    model_id: str | None = None


def check_prompt(prompt: object, option: str = "prompt") -> str:
    if not isinstance(prompt, str):
        raise InvalidOptionError(option, prompt, "must be a string")
    try:
        size = len(prompt.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidOptionError(option, prompt, "must be valid Unicode text (it holds a lone surrogate)") from None
    if size > MAX_PROMPT_BYTES:
        raise InvalidOptionError(option, f"<{size} bytes>", f"must be at most {MAX_PROMPT_BYTES} bytes of UTF-8")
    if "\x00" in prompt:
        raise InvalidOptionError(option, prompt, "must not contain NUL characters")
    if option == "prompt" and not prompt.strip():
        raise InvalidOptionError(option, prompt, "must contain visible text")
    return prompt


def parse_options(options: Mapping[str, Any] | None) -> Options:
    if options is not None and not isinstance(options, Mapping):
        raise InvalidOptionError("options", options, "must be a mapping of option names to values, or None")
    options = dict(options or {})
    for name in options:
        if name not in OPTION_NAMES:
            close = difflib.get_close_matches(str(name), OPTION_NAMES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; the options are {', '.join(OPTION_NAMES)}"
            raise InvalidOptionError(str(name), options[name], f"is not a textToImage option{hint}")
    width = _integer(options, "width", SIZE_MULTIPLE, MAX_SIDE, multiple=True)
    height = _integer(options, "height", SIZE_MULTIPLE, MAX_SIDE, multiple=True)
    steps = _integer(options, "numInferenceSteps", 1, MAX_STEPS)
    seed = _integer(options, "seed", 0, MAX_SEED)
    guidance = options.get("guidanceScale")
    if guidance is not None:
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)):
            raise InvalidOptionError("guidanceScale", guidance, "must be a number")
        try:
            finite = math.isfinite(guidance)
        except OverflowError:  # an int beyond any float
            finite = False
        if not finite:
            raise InvalidOptionError("guidanceScale", guidance, "must be a finite number (NaN would silently "
                                     "disable guidance)")
        if not 0 <= guidance <= MAX_GUIDANCE_SCALE:
            raise InvalidOptionError("guidanceScale", guidance, f"must be between 0 and {MAX_GUIDANCE_SCALE:g}")
        guidance = float(guidance)
    negative = options.get("negativePrompt")
    if negative is not None:
        negative = check_prompt(negative, "negativePrompt")
    model_id = options.get("modelId")
    if model_id is not None and (not isinstance(model_id, str) or not model_id.strip()
                                 or len(model_id) > MAX_MODEL_ID_LENGTH or not model_id.isprintable()):
        raise InvalidOptionError("modelId", model_id, f"must be a model id: printable, 1 to {MAX_MODEL_ID_LENGTH} "
                                 "characters")
    return Options(width=width, height=height, steps=steps, guidance_scale=guidance, negative_prompt=negative,
                   seed=seed, model_id=model_id)


def _integer(options: Mapping[str, Any], name: str, minimum: int, maximum: int, multiple: bool = False) -> int | None:
    value = options.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidOptionError(name, value, "must be an integer")
    if multiple and (value < minimum or value % SIZE_MULTIPLE):
        raise InvalidOptionError(name, value, f"must be a positive multiple of {SIZE_MULTIPLE}")
    if not minimum <= value <= maximum:
        raise InvalidOptionError(name, value, f"must be between {minimum} and {maximum}")
    return value


def check_grant(grant: Grant, options: Options) -> str:
    """The model to use; raise DeniedError when the options exceed what the capability grants."""
    params = grant.params
    model_id = options.model_id or params.default_model
    if params.allowed_models is not None and model_id not in params.allowed_models:
        raise DeniedError(f"model {model_id!r} is not allowed by capability {grant.capability.id!r}; it allows "
                          f"{list(params.allowed_models)}")
    for option, value, limit_name in (("width", options.width, "max_width"),
                                      ("height", options.height, "max_height"),
                                      ("numInferenceSteps", options.steps, "max_steps")):
        limit = getattr(params, limit_name)
        if limit is None:
            continue
        if value is None:
            # The model's default is not known here and could exceed the limit: the caller must choose.
            raise DeniedError(f"{option} is required with capability {grant.capability.id!r}, which limits it "
                              f"to {limit} ({limit_name})")
        if value > limit:
            raise DeniedError(f"{option}={value} exceeds {limit_name}={limit} of capability "
                              f"{grant.capability.id!r}")
    return model_id


class LeaseRenewer:
    """Renews every concurrency lease this layer holds, from one daemon thread, every third of a lease's life,
    so that only a holder that died loses its slot. One thread for all requests: a thread per request cost
    about a millisecond each to start and join."""

    def __init__(self, capabilities: Capabilities) -> None:
        self.capabilities = capabilities
        self._leases: dict[str, tuple[str, str]] = {}
        # Held while a lease is renewed, so that once discard() returns no renewal of that lease can start or
        # still be running: renew_slot re-takes a lease it cannot find (one reaped while its holder stalled),
        # and must not resurrect one its holder has just released.
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def add(self, lease: str, entity: str, capability_id: str) -> None:
        with self._lock:
            self._leases[lease] = (entity, capability_id)
            if self._thread is None:  # the first lease, or the first since close()
                # Each thread has its own stop event: a close() racing with this add() stops the old thread only.
                self._stop = threading.Event()
                self._thread = threading.Thread(target=self._run, args=(self._stop,),
                                                name="capability-lease-renewer", daemon=True)
                self._thread.start()

    def discard(self, lease: str) -> None:
        with self._lock:
            self._leases.pop(lease, None)

    def close(self) -> None:
        with self._lock:
            thread, stop, self._thread = self._thread, self._stop, None
        stop.set()
        if thread is not None:
            thread.join()

    def renew_all(self) -> None:
        with self._lock:
            leases = list(self._leases)
        for lease in leases:
            with self._lock:
                holder = self._leases.get(lease)
                if holder is None:  # released meanwhile
                    continue
                try:
                    self.capabilities.renew_slot(*holder, lease)
                except Exception:  # the generation cannot be stopped from here: say so, keep trying
                    logger.warning("lease %s of %s could not be renewed", lease, holder[1], exc_info=True)

    def _run(self, stop: threading.Event) -> None:
        while not stop.wait(LEASE_SECONDS / 3):
            self.renew_all()


class TextToImage:
    """The capability layer's entry point: ``text_to_image(entity, capability_id, prompt, options)``."""

    def __init__(self, store: Store, state_dir: Path | None,
                 retry_unavailable_s: float = RETRY_UNAVAILABLE_S) -> None:
        self.retry_unavailable_s = retry_unavailable_s
        self.capabilities = Capabilities(store)
        self.keys = ServerKeys(store, state_dir)
        self.renewer = LeaseRenewer(self.capabilities)
        self._gateways: dict[str, TritonGateway] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        self.renewer.close()
        with self._lock:
            gateways, self._gateways = list(self._gateways.values()), {}
        for gateway in gateways:
            gateway.close()

    def gateway(self, server_url: str) -> TritonGateway:
        with self._lock:
            gateway = self._gateways.get(server_url)
            if gateway is None:
                gateway = self._gateways[server_url] = TritonGateway(server_url, self.keys)
            return gateway

    def text_to_image(self, entity: str, capability_id: str, prompt: str,
                      options: Mapping[str, Any] | None = None, *,
                      on_progress: Callable[[Progress], None] | None = None,
                      cancellation: Cancellation | None = None,
                      on_accepted: Callable[[], None] | None = None) -> dict[str, Any]:
        """Generate one image; the result is ``{image, width, height, format, seed, model}``.

        With ``on_progress`` or ``cancellation`` it runs on the model's streaming variant, over gRPC:
        ``on_progress`` hears of every denoising step, and ``cancellation.cancel()`` (from any thread) stops
        the server's work after the current step and raises GenerationCancelledError here. ``on_accepted`` is
        called once every check has passed and the slot is taken, just before the server is called.
        """
        streaming = on_progress is not None or cancellation is not None
        grant = self.capabilities.authorize(entity, capability_id)  # records its own denials
        audit: dict[str, Any] = {"entity": entity, "capability_id": capability_id, "action": "generate",
                                 "model": None, "width": None, "height": None, "steps": None}
        lease: str | None = None
        try:
            try:
                checked_prompt = check_prompt(prompt)
                checked = parse_options(options)
                model_id = check_grant(grant, checked)
                audit.update(model=model_id, width=checked.width, height=checked.height, steps=checked.steps)
                gateway = self.gateway(grant.params.server_url)
                # A seed makes the request idempotent: while the server restarts, it is worth waiting for.
                retry = checked.seed is not None
                triton_model = self._when_available(lambda: gateway.resolve(model_id, streaming), retry,
                                                    cancellation)
                request = contract.TextToImage(
                    checked_prompt, negative_prompt=checked.negative_prompt, width=checked.width,
                    height=checked.height, num_inference_steps=checked.steps,
                    guidance_scale=checked.guidance_scale, seed=checked.seed,
                )
                # Re-checks the grant and takes a slot in one transaction, just before the server call.
                lease = self.capabilities.acquire_slot(entity, capability_id)
                self.renewer.add(lease, entity, capability_id)
                if on_accepted is not None:
                    on_accepted()
                if streaming:
                    generated = self._when_available(lambda: gateway.generate_streaming(
                        triton_model, request, on_progress, cancellation), retry, cancellation)
                else:
                    generated = self._when_available(lambda: gateway.generate(triton_model, request), retry)
                height, width, _ = generated.image.shape
                result = {"image": encode_png_base64(generated.image), "width": width, "height": height,
                          "format": "png", "seed": generated.seed, "model": model_id}
            except CapabilityError as error:
                outcome = ("denied" if isinstance(error, (DeniedError, InvalidOptionError, RequestRefusedError))
                           else "cancelled" if isinstance(error, GenerationCancelledError) else "failed")
                self._finish(lease, {**audit, "outcome": outcome, "detail": str(error)})
                lease = None
                raise
            except Exception as error:
                self._finish(lease, {**audit, "outcome": "failed", "detail": f"{type(error).__name__}: {error}"})
                lease = None
                raise
            self._finish(lease, {**audit, "outcome": "ok", "width": width, "height": height})
            lease = None
            return result
        finally:
            if lease is not None:  # interrupted, or the audited release failed: free the slot, audit nothing
                self.renewer.discard(lease)
                try:
                    self.capabilities.release_slot(lease)
                except Exception:  # the exception on its way out says more; the lease expires by itself
                    logger.warning("lease %s could not be released; it expires in %d s", lease, LEASE_SECONDS,
                                   exc_info=True)

    def _when_available(self, call: Callable[[], Result], retry: bool,
                        cancellation: Cancellation | None = None) -> Result:
        """``call()``; if the server is temporarily unavailable and ``retry``, again with backoff for up to
        ``retry_unavailable_s`` (the slot, if taken, stays held and renewed meanwhile). A cancel ends the wait."""
        deadline = time.monotonic() + self.retry_unavailable_s
        delay = _FIRST_RETRY_DELAY_S
        while True:
            try:
                return call()
            except TemporarilyUnavailableError:
                if not retry or time.monotonic() + delay >= deadline:
                    raise
                logger.info("server temporarily unavailable; retrying a seeded request in %.1f s", delay)
                if cancellation is None:
                    time.sleep(delay)
                elif cancellation.wait(delay):
                    raise GenerationCancelledError(
                        "cancelled by the caller while waiting for the server to come back") from None
                delay = min(2 * delay, _MAX_RETRY_DELAY_S)

    def release_thread_clients(self) -> None:
        """Close this thread's connections to the servers: a thread that ends would otherwise leave them open
        until :meth:`close` (each :class:`Generation` runs in a thread of its own)."""
        with self._lock:
            gateways = list(self._gateways.values())
        for gateway in gateways:
            gateway.drop_thread_client()

    def _finish(self, lease: str | None, record: dict[str, Any]) -> None:
        """Audit the outcome and, if a slot was taken, free it in the same transaction."""
        if lease is None:
            self.capabilities.record(**record)
        else:
            self.renewer.discard(lease)
            self.capabilities.release_slot(lease, record)


class Generation:
    """A streaming generation running in a thread of its own: :meth:`result` waits for it, :meth:`cancel` stops
    it (the server stops after the denoising step it is at; ``result()`` then raises GenerationCancelledError).

    ``run(cancellation)`` is the generation itself, e.g. a ``TextToImage.text_to_image`` call.
    """

    def __init__(self, run: Callable[[Cancellation], dict[str, Any]],
                 cleanup: Callable[[], None] | None = None) -> None:
        """``cleanup`` runs in the generation's thread when it ends (e.g. ``TextToImage.release_thread_clients``)."""
        self._cleanup = cleanup
        self._cancellation = Cancellation()
        self._outcome: dict[str, Any] | BaseException | None = None
        # An Event, not Thread.join: a KeyboardInterrupt in join() can leave the thread looking finished while it
        # runs on (CPython bpo-21822).
        self._done = threading.Event()
        threading.Thread(target=self._run, args=(run,), name="text-to-image", daemon=True).start()

    def _run(self, run: Callable[[Cancellation], dict[str, Any]]) -> None:
        try:
            self._outcome = run(self._cancellation)
        except BaseException as error:  # handed to whoever calls result()
            self._outcome = error
        finally:
            try:
                if self._cleanup is not None:
                    self._cleanup()
            except Exception:  # the generation's own outcome matters more than its connections' closing
                logger.warning("closing a finished generation's connections failed", exc_info=True)
            self._done.set()

    def cancel(self) -> None:
        self._cancellation.cancel()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout_s: float | None = None) -> dict[str, Any]:
        """The result (as ``text_to_image``'s), or the error the generation ended with; waits ``timeout_s`` at
        most (None: for as long as it runs), in slices, so that Ctrl-C reaches a waiting main thread."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._done.wait(0.1):
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"the generation is still running after {timeout_s} s")
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        assert self._outcome is not None
        return self._outcome
