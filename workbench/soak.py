"""``scripts/soak``: N concurrent clients x M generations each through the capability layer (``textToImage``)
against a real tritonserver with the tiny models, every response checked against its own request.

- **References first.** A small set of distinct request shapes (model, size, seed, prompt, steps) is generated
  once each, alone, before the load. Under load every response is decoded and compared with the reference of
  the shape its request asked for: same model, seed and size, and the same pixels within one uint8 step (the
  documented reproducibility under batching and shared cores, docs/contract.md; different noise differs
  by up to 255). A response that went to the wrong caller is caught, unless both asked for the same shape.
- **Below the queue limit.** At most ``max_queue_size`` clients (16 per model), each with one request in flight,
  so no model's queue can overflow: every error counts as a failure, and 5xx answers are counted apart.
- **Capabilities as deployed.** The operator mints one capability (``max_concurrent`` = clients, the four tiny
  models) and delegates one child per client (``max_concurrent`` 1) given to that client's entity. A lease that
  leaked would show as a ``ConcurrencyLimitError``; at the end no lease may be held.
- **Audit.** Each client's capability must have exactly one ``generate`` record per request it made, in order,
  with the request's model, size and steps, all ``ok``.
- **Memory.** The server's PSS (tritonserver and its Python stubs, :func:`.loadtest.server_memory`) is sampled
  every few seconds; growth is the median of the last quarter of the curve minus that of the first.

Writes ``bench/soak.json`` (``--out``) and prints a short report; exits 1 when a check failed. ``--duration``
bounds the run: no new request is issued after it (those are reported as not issued, not as lost).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import re
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from triton_launcher.paths import MODEL_REPOSITORY
from triton_launcher.repository import FAMILY_MODELS, TINY_PREFIX, build_tiny_repository
from triton_launcher.server import TritonServer, loopback_options

from .loadtest import RESULTS_DIR, machine, server_memory

if TYPE_CHECKING:
    from capability import CapabilityHandle, CapabilityLayer

TINY_MODELS = tuple(TINY_PREFIX + family for family in FAMILY_MODELS)
SIZES = ((64, 64), (128, 96), (96, 160), (160, 128), (192, 192), (256, 128))
"""(width, height): multiples of 16, which every family accepts (SD3 and FLUX need 16)."""
PIXEL_TOLERANCE = 1
"""Largest per-channel difference from the reference that still counts as the same image: a request batched
with others, or run while another instance shares the cores, matches its solo image within one uint8 step."""
OPERATOR = "soak-operator"
CURVE_POINTS_SHOWN = 12
DRAIN_TIMEOUT_S = 600.0
"""How long requests still in flight at the end may take before they are counted as lost (a hang guard)."""


@dataclass(frozen=True)
class Shape:
    """One distinct request: every request of the soak is one of these."""

    model: str
    width: int
    height: int
    seed: int
    steps: int
    prompt: str

    def options(self) -> dict[str, Any]:
        return {"modelId": self.model, "width": self.width, "height": self.height,
                "numInferenceSteps": self.steps, "seed": self.seed}


@dataclass(frozen=True)
class Plan:
    clients: int = 12
    generations: int = 200
    """Per client."""
    duration_s: float = 600.0
    """Upper bound: no request is issued after it."""
    shapes: int = 24
    steps: int = 8
    sample_interval_s: float = 5.0


QUICK = Plan(clients=6, generations=25, duration_s=300.0, shapes=12, sample_interval_s=0.5)
"""The CI size (tests/integration/test_soak.py): sampled often enough for a curve of a few dozen points."""


def request_shapes(count: int, steps: int) -> list[Shape]:
    """``count`` distinct shapes cycling through the four families and :data:`SIZES`, each with its own seed
    and prompt, so that no two shapes can give the same image."""
    return [Shape(model=TINY_MODELS[index % len(TINY_MODELS)],
                  width=SIZES[(index // len(TINY_MODELS)) % len(SIZES)][0],
                  height=SIZES[(index // len(TINY_MODELS)) % len(SIZES)][1],
                  seed=1000 + index, steps=steps, prompt=f"soak shape {index}: a lighthouse on a cliff at dawn")
            for index in range(count)]


def client_schedule(client: int, generations: int, shape_count: int) -> list[int]:
    """Indices of the shapes client ``client`` asks for, in order: a fixed pseudo-random walk per client, so
    concurrent requests mix models and sizes and a run can be repeated exactly."""
    walk = random.Random(f"soak-client-{client}")  # noqa: S311 - a reproducible mix, not a secret
    return [walk.randrange(shape_count) for _ in range(generations)]


def queue_limit(repository: Path) -> int:
    """The smallest ``max_queue_size`` of the models in ``repository``."""
    limits = [int(match) for config in sorted(repository.glob("*/config.pbtxt"))
              for match in re.findall(r"max_queue_size:\s*(\d+)", config.read_text(encoding="utf-8"))]
    if not limits:
        raise ValueError(f"no model in {repository} sets max_queue_size")
    return min(limits)


def decode_png_base64(encoded: str) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(encoded, validate=True))) as image:
        if image.format != "PNG" or image.mode != "RGB":
            raise ValueError(f"expected an RGB PNG, got {image.format} {image.mode}")
        return np.asarray(image)


@dataclass(frozen=True)
class Check:
    """A response compared with its request's reference: ``problem`` is None when it matches."""

    problem: str | None
    exact: bool = False


def check_response(shape: Shape, reference: np.ndarray, result: Mapping[str, Any]) -> Check:
    """Is ``result`` (a ``textToImage`` result) the answer to a request for ``shape``?"""
    for problem, answered, asked in (("wrong model", result.get("model"), shape.model),
                                     ("wrong seed", result.get("seed"), shape.seed),
                                     ("wrong size", (result.get("width"), result.get("height")),
                                      (shape.width, shape.height))):
        if answered != asked:
            return Check(problem)
    try:
        image = decode_png_base64(str(result.get("image")))
    except Exception:  # any undecodable payload is one kind of mismatch
        return Check("undecodable image")
    if image.shape != (shape.height, shape.width, 3):
        return Check("wrong size")
    if image.shape != reference.shape:  # a reference of another shape: no pixel-wise comparison is possible
        return Check("different image")
    difference = int(np.abs(image.astype(np.int16) - reference.astype(np.int16)).max())
    if difference > PIXEL_TOLERANCE:
        return Check("different image")
    return Check(None, exact=difference == 0)


def error_class(error: BaseException) -> str:
    return type(error).__name__


def is_server_5xx(error: BaseException) -> bool:
    """Did the server answer with a 5xx? The layer turns 503 queue refusals into ServerBusyError and any other
    server failure into GenerationError naming the status."""
    from capability import GenerationError, ServerBusyError

    return isinstance(error, ServerBusyError) or (
        isinstance(error, GenerationError) and re.search(r"\(5\d\d\)", str(error)) is not None)


def memory_growth(values: Sequence[float]) -> dict[str, float]:
    """Median of the last quarter of a memory curve minus the median of its first quarter (MiB and as a
    fraction of the first); medians, so that one sample taken mid-batch does not decide."""
    if not values:
        raise ValueError("no memory samples")
    quarter = max(1, len(values) // 4)
    first, last = statistics.median(values[:quarter]), statistics.median(values[-quarter:])
    return {"first_quarter_median_mib": first, "last_quarter_median_mib": last,
            "growth_mib": last - first, "growth_fraction": round((last - first) / first, 4) if first else 0.0}


def audit_problems(expected: Sequence[Shape], records: Sequence[Mapping[str, Any]]) -> list[str]:
    """What is wrong with a client capability's ``generate`` audit records, given the requests it made in
    order; empty when there is exactly one successful record per request, in order, matching it."""
    problems = []
    if len(records) != len(expected):
        problems.append(f"{len(records)} generate records for {len(expected)} requests")
    for position, (shape, record) in enumerate(zip(expected, records, strict=False)):
        seen = (record.get("model"), record.get("width"), record.get("height"), record.get("steps"))
        wanted = (shape.model, shape.width, shape.height, shape.steps)
        if record.get("outcome") != "ok":
            problems.append(f"request {position}: outcome {record.get('outcome')!r}")
        elif seen != wanted:
            problems.append(f"request {position}: recorded {seen}, requested {wanted}")
    return problems


# --- the run ------------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What the clients saw, shared by their threads (under ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    issued: int = 0
    answered: int = 0
    ok: int = 0
    exact: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    server_5xx: int = 0
    mismatches: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    issued_by_client: dict[int, list[Shape]] = field(default_factory=dict)

    def add_error(self, error: BaseException) -> None:
        with self.lock:
            self.answered += 1
            self.errors[error_class(error)] += 1
            self.server_5xx += is_server_5xx(error)

    def add_answer(self, latency_s: float, check: Check) -> None:
        with self.lock:
            self.answered += 1
            self.latencies.append(latency_s)
            if check.problem is None:
                self.ok += 1
                self.exact += check.exact
            else:
                self.mismatches[check.problem] += 1

    def snapshot(self) -> Tally:
        """A copy of the counts (call with ``lock`` held)."""
        return Tally(issued=self.issued, answered=self.answered, ok=self.ok, exact=self.exact,
                     errors=Counter(self.errors), server_5xx=self.server_5xx, mismatches=Counter(self.mismatches),
                     latencies=list(self.latencies),
                     issued_by_client={client: list(shapes) for client, shapes in self.issued_by_client.items()})


class MemorySampler:
    """Samples the server's memory every ``interval_s`` from a thread of its own, until stopped."""

    def __init__(self, server: TritonServer, interval_s: float, tally: Tally) -> None:
        self.server = server
        self.interval_s = interval_s
        self.tally = tally
        self.points: list[dict[str, Any]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="soak-memory", daemon=True)

    def sample(self) -> None:
        memory = server_memory(self.server)
        with self.tally.lock:
            answered = self.tally.answered
        self.points.append({"t_s": round(time.monotonic() - self._started, 1), "answered": answered,
                            "total_pss_mib": memory["total_pss_mib"], "instances": memory["instances"]})

    def __enter__(self) -> MemorySampler:
        self._started = time.monotonic()
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(self.interval_s):  # a periodic sampler, not a synchronisation
            try:
                self.sample()
            except psutil.Error as error:  # a process went away between listing and reading it: one gap
                self.failures.append(f"{type(error).__name__}: {error}")


@dataclass(frozen=True)
class Clients:
    """The capabilities of a soak: the operator's (``root``), one delegated child per client; the reference image
    of every shape, and what each client will ask for."""

    root: CapabilityHandle
    handles: dict[int, CapabilityHandle]
    references: dict[Shape, np.ndarray]
    schedules: dict[int, list[Shape]]


def prepare(layer: CapabilityLayer, server: TritonServer, plan: Plan) -> Clients:
    shapes = request_shapes(plan.shapes, plan.steps)
    schedules = {client: [shapes[index] for index in client_schedule(client, plan.generations, len(shapes))]
                 for client in range(plan.clients)}
    authority = layer.create_authority(OPERATOR)
    root = layer.mint(OPERATOR, authority.id, {
        "server_url": server.url, "default_model": TINY_MODELS[0], "allowed_models": list(TINY_MODELS),
        "max_concurrent": plan.clients})
    print(f"references: {len(shapes)} distinct requests, each generated alone…", flush=True)
    references = {shape: decode_png_base64(root.text_to_image(shape.prompt, shape.options())["image"])
                  for shape in shapes}
    handles = {client: root.delegate({"max_concurrent": 1}).give(f"soak-client-{client}")
               for client in range(plan.clients)}
    return Clients(root, handles, references, schedules)


def drive(layer: CapabilityLayer, clients: Clients, plan: Plan, tally: Tally,
          sampler: MemorySampler) -> tuple[float, int]:
    """Every client's schedule from a thread of its own, all released at once; (seconds, threads stuck)."""
    deadline = time.monotonic() + plan.duration_s
    start_together = threading.Barrier(plan.clients + 1)

    def client_loop(client: int) -> None:
        handle = clients.handles[client]
        try:
            start_together.wait()
            for shape in clients.schedules[client]:
                if time.monotonic() >= deadline:
                    return
                with tally.lock:
                    tally.issued += 1
                    tally.issued_by_client.setdefault(client, []).append(shape)
                began = time.perf_counter()
                try:
                    result = handle.text_to_image(shape.prompt, shape.options())
                except Exception as error:  # counted by class; the client goes on, as a real one would
                    tally.add_error(error)
                    continue
                tally.add_answer(time.perf_counter() - began,
                                 check_response(shape, clients.references[shape], result))
        finally:
            layer.store.close()  # this thread's store connection

    threads = [threading.Thread(target=client_loop, args=(client,), name=f"soak-client-{client}", daemon=True)
               for client in range(plan.clients)]
    for thread in threads:
        thread.start()
    print(f"load: {plan.clients} clients x {plan.generations} generations (at most {plan.duration_s:.0f} s)…",
          flush=True)
    with sampler:
        start_together.wait()
        began = time.monotonic()
        drain_until = deadline + DRAIN_TIMEOUT_S
        for thread in threads:
            thread.join(timeout=max(0.0, drain_until - time.monotonic()))
        duration = time.monotonic() - began
    return duration, sum(thread.is_alive() for thread in threads)


def audit_findings(layer: CapabilityLayer, clients: Clients,
                   issued_by_client: Mapping[int, Sequence[Shape]]) -> dict[str, list[str]]:
    """Each client capability's audit problems (see :func:`audit_problems`), for those that have any."""
    findings = {}
    for client, handle in clients.handles.items():
        records = [record for record in layer.capabilities.audit_log(handle.entity, handle.id)
                   if record["action"] == "generate"]
        problems = audit_problems(issued_by_client.get(client, []), records)
        if problems:
            findings[handle.entity] = problems[:5]
    return findings


def leases_held(layer: CapabilityLayer, capability_id: str) -> int:
    """Leases counted against ``capability_id``'s budget, its delegates' included."""
    (count,) = layer.store.read().execute(
        "SELECT COUNT(*) FROM lease_budgets WHERE capability_id = ?", (capability_id,)).fetchone()
    return int(count)


def run_soak(server: TritonServer, plan: Plan) -> dict[str, Any]:
    """The soak against a running server with the tiny models; the report (see the module's docstring)."""
    from capability import CapabilityLayer

    tally = Tally()
    sampler = MemorySampler(server, plan.sample_interval_s, tally)
    with CapabilityLayer(server.options.state_dir) as layer:
        clients = prepare(layer, server, plan)
        duration, stuck = drive(layer, clients, plan, tally, sampler)
        with tally.lock:  # a stuck client could still be counting
            seen = tally.snapshot()
        audit = audit_findings(layer, clients, seen.issued_by_client)
        held = leases_held(layer, clients.root.id)
    return summarize(plan, seen, duration=duration, stuck=stuck, sampler=sampler, audit=audit, held=held)


def summarize(plan: Plan, seen: Tally, *, duration: float, stuck: int, sampler: MemorySampler,
              audit: dict[str, list[str]], held: int) -> dict[str, Any]:
    planned = plan.clients * plan.generations
    lost = seen.issued - seen.answered
    mismatched = sum(seen.mismatches.values())
    latencies = sorted(seen.latencies)
    report: dict[str, Any] = {
        "settings": {**asdict(plan), "sizes": [list(size) for size in SIZES], "models": list(TINY_MODELS),
                     "pixel_tolerance": PIXEL_TOLERANCE},
        "clients": plan.clients,
        "generations_per_client": plan.generations,
        "duration_s": round(duration, 1),
        "requests": {"planned": planned, "issued": seen.issued, "answered": seen.answered, "ok": seen.ok,
                     "bit_identical": seen.exact, "not_issued": planned - seen.issued, "threads_stuck": stuck},
        "lost": lost,
        "mismatched": mismatched,
        "mismatches": dict(seen.mismatches),
        "errors": dict(seen.errors),
        "server_5xx": seen.server_5xx,
        "throughput_per_s": round(seen.answered / duration, 2) if duration else 0.0,
        "latency_ms": {"p50": round(statistics.median(latencies) * 1000, 1),
                       "p95": round(latencies[round(0.95 * (len(latencies) - 1))] * 1000, 1)} if latencies else {},
        "memory": {"points": sampler.points, "growth": memory_growth([point["total_pss_mib"]
                                                                      for point in sampler.points]),
                   "sample_failures": sampler.failures},
        "audit": {"complete": not audit, "problems": audit},
        "leases_held_after": held,
    }
    report["passed"] = (lost == 0 and mismatched == 0 and not seen.errors and not audit and held == 0
                        and seen.answered > 0)
    return report


def print_report(report: dict[str, Any]) -> None:
    requests, memory = report["requests"], report["memory"]
    growth = memory["growth"]
    settings = report["settings"]
    print(f"\n{settings['clients']} clients x {settings['generations']} generations, {requests['answered']} answered "
          f"in {report['duration_s']:.0f} s ({report['throughput_per_s']:.1f}/s, p50 "
          f"{report['latency_ms'].get('p50', 0):.0f} ms, p95 {report['latency_ms'].get('p95', 0):.0f} ms)")
    print(f"lost {report['lost']}, mismatched {report['mismatched']} {report['mismatches'] or ''}, errors "
          f"{sum(report['errors'].values())} {report['errors'] or ''} (5xx: {report['server_5xx']}), not issued "
          f"{requests['not_issued']}; bit-identical to the reference: {requests['bit_identical']} of {requests['ok']}")
    print(f"audit complete: {report['audit']['complete']}; leases held after: {report['leases_held_after']}")
    points = memory["points"]
    shown = points[::max(1, len(points) // CURVE_POINTS_SHOWN)]
    if shown[-1] is not points[-1]:
        shown.append(points[-1])
    curve = ", ".join(f"{point['t_s']:g} s: {point['total_pss_mib']}" for point in shown)
    print(f"server PSS in MiB, {len(points)} samples (bench/soak.json has all): {curve}")
    print(f"memory growth, last-quarter median - first-quarter median: {growth['growth_mib']:+.0f} MiB "
          f"({growth['growth_fraction']:+.1%})")
    print("PASSED" if report["passed"] else "FAILED")


def soak(plan: Plan, out: Path) -> dict[str, Any]:
    repository = build_tiny_repository()
    with tempfile.TemporaryDirectory(prefix="soak-") as scratch, \
            TritonServer(loopback_options(repository, Path(scratch) / "state", ready_timeout_s=300)) as server:
        report = run_soak(server, plan)
    report = {"machine": machine(), "queue_limit": queue_limit(repository), **report}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK.clients} clients x {QUICK.generations} generations (the CI size)")
    parser.add_argument("--clients", type=int, help=f"concurrent clients (default {Plan.clients})")
    parser.add_argument("--generations", type=int, help=f"generations per client (default {Plan.generations})")
    parser.add_argument("--duration", type=float, help=f"upper bound in seconds (default {Plan.duration_s:.0f})")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "soak.json", help="the JSON report")
    arguments = parser.parse_args(argv)
    plan = QUICK if arguments.quick else Plan()
    plan = Plan(**{**asdict(plan), **{name: value for name, value in (
        ("clients", arguments.clients), ("generations", arguments.generations),
        ("duration_s", arguments.duration)) if value is not None}})
    limit = queue_limit(MODEL_REPOSITORY)  # the tiny models' configs are derived from these
    if not 1 <= plan.clients <= limit:
        parser.error(f"--clients must be 1 to {limit} (max_queue_size): the soak stays below the queue limit")
    if plan.generations < 1 or plan.duration_s <= 0:
        parser.error("--generations and --duration must be positive")
    report = soak(plan, arguments.out)
    print_report(report)
    print(f"wrote {arguments.out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
