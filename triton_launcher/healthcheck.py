"""``python -m triton_launcher.healthcheck``: exit 0 if every model of the running server answers a real inference.

The container's health check (docker/compose.yaml). Triton's ``/v2/health/ready`` stays 200 while a model's
Python stub is dead (Triton issue 8604), so, like the launcher's start-up probe, this sends each model one
64x64, one-step inference and checks the image that comes back. It reads what the launcher left in the state
dir: ``server.json`` (the URLs, the models, which of them stream) and the inference key. Streaming (decoupled)
models answer on gRPC streams only, so they are probed there.

Prints one line per model (on stdout when it answered, on stderr when it did not); exit 1 if any model or the
server description failed, else 0.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from inference_client import triton
from inference_client.state import STATE_DIR, ServerDescription, StateDirError, read_server_description

DEFAULT_TIMEOUT_S = 300.0
"""For all models together. A probe waits in a model's queue like any request, so a busy server needs time;
the same default as the watchdog's probe timeout."""


class UnhealthyError(Exception):
    """The server cannot be checked, or a model did not answer as it should."""


def probe_model(server: ServerDescription, model: str, timeout_s: float) -> str:
    """One real inference on ``model``: "ok", or "busy" if Triton's queue refused it (full, or timed out: the
    model works, it has more to do than it can queue, as the watchdog judges too); UnhealthyError unless it
    returns a PROBE_SIDE x PROBE_SIDE RGB image. A busy pod stays in rotation: taking it out would only pile its
    load onto the others, which would fill up and drop out in turn."""
    try:
        image = triton.probe_inference(server.http_address, server.grpc_address, model, server.infer_key,
                                       streaming=model in server.streaming_models, timeout_s=timeout_s)
    except Exception as error:  # whatever the client raised, the model did not answer: report it as such
        if triton.QUEUE_FULL in str(error) or triton.QUEUE_TIMEOUT in str(error):
            return "busy"
        raise UnhealthyError(f"{model}: inference failed: {error}") from error
    if image.shape != (triton.PROBE_SIDE, triton.PROBE_SIDE, 3):
        side = triton.PROBE_SIDE
        raise UnhealthyError(f"{model}: returned an image of shape {image.shape}, not ({side}, {side}, 3)")
    return "ok"


def check(state_dir: Path, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[str]:
    """Probe every model of the server in ``state_dir``, within ``timeout_s`` in all; the failures (empty: healthy).

    Every model is probed even after one has failed, so that the report names all the broken ones.
    """
    try:
        server = read_server_description(state_dir)
    except StateDirError as error:
        return [str(error)]
    deadline = time.monotonic() + timeout_s
    failures = []
    for model in server.models:
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:
            failures.append(f"{model}: not probed, the {timeout_s:.0f} s allowed for the check ran out")
            continue
        started = time.monotonic()
        try:
            verdict = probe_model(server, model, remaining_s)
        except UnhealthyError as error:
            failures.append(str(error))
            print(f"unhealthy: {error}", file=sys.stderr)
        else:
            print(f"{verdict}: {model} ({time.monotonic() - started:.2f} s)")
    return failures


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m triton_launcher.healthcheck", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", type=Path, default=STATE_DIR,
                        help="the launcher's state dir (default: %(default)s, or $TRITON_DIFFUSERS_STATE)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                        help="for the whole check, every model included (default: %(default)s)")
    arguments = parser.parse_args(argv)
    if arguments.timeout <= 0:
        parser.error(f"--timeout={arguments.timeout} is invalid: must be a positive number of seconds")
    return arguments


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    failures = check(arguments.state_dir, arguments.timeout)
    if failures:
        print(f"unhealthy: {len(failures)} failure(s); first: {failures[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
