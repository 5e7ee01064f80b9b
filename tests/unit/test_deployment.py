"""The GPU image, its compose file and the local launcher stay in step: same repository, same tritonserver flags,
same pins (but the torch build), and a compose file that reserves GPUs, keeps weights, passes HF_TOKEN, sizes
shared memory and checks health by real inference. No Docker engine here, so the files are read and the
launcher is run with --dry-run as the container would run it."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from triton_launcher import healthcheck
from triton_launcher.__main__ import ALL_INTERFACES, listen_arguments, parse_arguments
from triton_launcher.paths import PROJECT_ROOT
from triton_launcher.server import STUB_EXIT_GRACE_S

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (the NGC image's) has no tomllib
    tomllib = pytest.importorskip("tomli")

PYPROJECT = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
DOCKERFILE = (PROJECT_ROOT / "docker" / "Dockerfile").read_text()
"""Read as written: FROM and COPY on one line each, ENTRYPOINT and CMD in JSON form, ENV may continue lines."""
COMPOSE_FILE = PROJECT_ROOT / "docker" / "compose.yaml"
LAUNCHER = ["python3", "-m", "triton_launcher"]
DEFAULT_MAX_SIDE = 2048
"""diffusers_backend/settings.py's default max_width and max_height."""


def dockerfile_instruction_lines(name: str) -> list[str]:
    return [line for line in DOCKERFILE.splitlines() if line.startswith(f"{name} ")]


def dockerfile_instruction(name: str) -> list[str]:
    """The arguments of the Dockerfile's (single) JSON-form instruction ``name``."""
    lines = dockerfile_instruction_lines(name)
    assert len(lines) == 1, f"one {name} expected, found {lines}"
    value = json.loads(lines[0].removeprefix(f"{name} "))
    assert isinstance(value, list)
    return [str(item) for item in value]


def dockerfile_environment() -> dict[str, str]:
    """ENV settings, including the continued ``ENV A=1 \\ B=2`` form."""
    joined = DOCKERFILE.replace("\\\n", " ")
    settings: dict[str, str] = {}
    for line in joined.splitlines():
        if line.startswith("ENV "):
            for setting in shlex.split(line.removeprefix("ENV ")):
                name, _, value = setting.partition("=")
                settings[name] = value
    return settings


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")  # huggingface_hub's dependency; absent from the torch-free 3.10 check
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def service(compose: dict[str, Any]) -> dict[str, Any]:
    services = compose["services"]
    assert list(services) == ["triton"], "one service: the server"
    return dict(services["triton"])


def container_launcher_arguments(service: dict[str, Any]) -> list[str]:
    """What the container passes to the launcher: ENTRYPOINT, then compose's command or else the image's CMD."""
    entrypoint = service.get("entrypoint", dockerfile_instruction("ENTRYPOINT"))
    command = service.get("command", dockerfile_instruction("CMD"))
    assert entrypoint[:len(LAUNCHER)] == LAUNCHER, "the container runs the launcher of scripts/serve"
    return [*entrypoint[len(LAUNCHER):], *command]


def dry_run(arguments: list[str]) -> list[str]:
    """The tritonserver command line ``python -m triton_launcher ARGUMENTS --dry-run`` prints."""
    completed = subprocess.run([sys.executable, "-m", "triton_launcher", *arguments, "--dry-run"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, check=True, timeout=120)
    return shlex.split(completed.stdout)


def without_installation_paths(command: list[str]) -> list[str]:
    """``command`` with where tritonserver is installed taken out: the one thing that differs by machine."""
    return ["tritonserver", *(argument for argument in command[1:] if not argument.startswith("--backend-directory="))]


def last_values(command: list[str]) -> dict[str, str]:
    """flag -> value as tritonserver reads ``command``: the last occurrence of a flag wins."""
    return dict(argument.split("=", 1) for argument in command[1:] if "=" in argument)


def ngc_layout(root: Path) -> Path:
    """A stand-in for the image's /opt/tritonserver (a tritonserver binary beside backends/python/)."""
    (root / "bin").mkdir(parents=True)
    (root / "backends" / "python").mkdir(parents=True)
    (root / "backends" / "python" / "libtriton_python.so").touch()
    executable = root / "bin" / "tritonserver"
    executable.touch(mode=0o755)
    return executable


def test_image_is_built_from_the_ngc_release_of_the_bundled_server() -> None:
    server = PYPROJECT["tool"]["triton-diffusers"]["server"]
    assert dockerfile_instruction_lines("FROM") == [f"FROM nvcr.io/nvidia/tritonserver:{server['ngc-release']}-py3"]
    # NGC 24.10 ships tritonserver 2.51.0, the server the tests run; its clients speak the KServe v2 protocol,
    # over HTTP and gRPC, which newer tritonclient releases speak too.
    assert (server["ngc-release"], server["triton-version"]) == ("24.10", "2.51.0")
    assert [pin for pin in PYPROJECT["project"]["dependencies"] if pin.startswith("tritonclient")] == [
        "tritonclient[http,grpc]==2.73.0"]


def test_image_installs_exactly_the_pyproject_pins_from_pypi_so_only_the_torch_build_differs() -> None:
    installs = re.findall(r"pip install ([^\n&\\]*)", DOCKERFILE)
    # pyproject.toml itself, resolved by the image's Python 3.10: its pins for 3.10, nothing added or overridden.
    assert [shlex.split(install) for install in installs] == [["--no-cache-dir", "-e", ".[server]"]]
    # No other index: torch==2.13.0 from PyPI is the CUDA build on Linux, the CPU build here is the same version.
    instructions = "\n".join(line for line in DOCKERFILE.splitlines() if not line.startswith("#"))
    assert not re.search(r"index-url|find-links|constraint|requirements|--pre\b", instructions)
    torch_pins = [pin for pin in PYPROJECT["project"]["optional-dependencies"]["server"] if pin.startswith("torch==")]
    assert torch_pins == ["torch==2.13.0"], "a local version (+cpu, +cu12x) would pin one build everywhere"
    assert "COPY pyproject.toml" in DOCKERFILE


def test_image_serves_the_model_repository_beside_the_launcher_as_a_checkout_does() -> None:
    copies = dict(line.split()[1:3] for line in dockerfile_instruction_lines("COPY") if len(line.split()) == 3)
    # PROJECT_ROOT in the image is the WORKDIR: the editable install puts triton_launcher/ there, and the
    # launcher's default repository is PROJECT_ROOT/model_repository.
    assert copies["triton_launcher"] == "./triton_launcher"
    assert copies["model_repository"] == "./model_repository"
    assert copies["diffusers_backend"] == "./diffusers_backend"  # what model.py imports
    assert copies["inference_client"] == "./inference_client"  # the contract, the probes' client
    assert "USER triton-server" in DOCKERFILE  # the NGC image's own non-root user, uid 1000


def test_container_runs_scripts_serve_with_its_defaults_but_the_listen_address_and_log(service: dict[str, Any]) -> None:
    serve = (PROJECT_ROOT / "scripts" / "serve").read_text()
    assert '-m triton_launcher "$@"' in serve
    container = vars(parse_arguments(container_launcher_arguments(service)))
    local = vars(parse_arguments([]))
    differing = {name for name in local if container[name] != local[name]}
    # The watchdog, its probe timeout, the ready timeout, the ports and the repository are scripts/serve's.
    assert differing == {"listen_address", "log_file"}
    assert container["listen_address"] == ALL_INTERFACES
    assert str(container["log_file"]) == "-"  # docker logs


def test_container_command_line_resolves_to_the_tritonserver_arguments_of_scripts_serve(
    service: dict[str, Any], tmp_path: Path,
) -> None:
    image_server = ngc_layout(tmp_path / "opt" / "tritonserver")
    container = dry_run([*container_launcher_arguments(service), "--tritonserver", str(image_server)])
    local = dry_run([])  # what scripts/serve --dry-run prints
    assert container[0] == str(image_server)
    assert f"--backend-directory={image_server.parent.parent / 'backends'}" in container
    # The same flags in the same order, then the three address flags that move the endpoints off loopback.
    assert without_installation_paths(container) == [*without_installation_paths(local),
                                                      *listen_arguments(ALL_INTERFACES)]
    assert last_values(container)["--model-repository"] == str(PROJECT_ROOT / "model_repository")
    assert {last_values(container)[f"--{endpoint}-address"] for endpoint in ("http", "grpc", "metrics")} == {
        ALL_INTERFACES}


def test_compose_publishes_every_endpoint_on_the_host_loopback_only(
    service: dict[str, Any], tmp_path: Path,
) -> None:
    container = last_values(dry_run([*container_launcher_arguments(service), "--tritonserver",
                                     str(ngc_layout(tmp_path / "tritonserver"))]))
    endpoints = {int(container[f"--{endpoint}-port"]) for endpoint in ("http", "grpc", "metrics")}
    published = [port.split(":") for port in service["ports"]]
    assert all(len(parts) == 3 and parts[0] == "127.0.0.1" for parts in published), service["ports"]
    assert {int(container_port) for _, _, container_port in published} == endpoints
    assert "network_mode" not in service


def test_compose_builds_this_dockerfile_and_reserves_the_gpus(service: dict[str, Any]) -> None:
    assert (COMPOSE_FILE.parent / service["build"]["context"]).resolve() == PROJECT_ROOT
    assert (PROJECT_ROOT / service["build"]["dockerfile"]).resolve() == PROJECT_ROOT / "docker" / "Dockerfile"
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]


def test_compose_keeps_weights_and_state_in_volumes_and_passes_hf_token_through(
    compose: dict[str, Any], service: dict[str, Any],
) -> None:
    environment = dockerfile_environment()
    mounts = dict(reversed(volume.split(":", 1)) for volume in service["volumes"])
    assert set(mounts.values()) <= set(compose["volumes"]), "named volumes, declared"
    assert environment["HF_HOME"] in mounts
    assert environment["TRITON_DIFFUSERS_STATE"] in mounts
    # A bare name takes its value from the environment of `docker compose`; the token is in no file.
    assert "HF_TOKEN" in service["environment"]
    assert not any(str(entry).startswith("HF_TOKEN=") for entry in service["environment"])


def test_compose_shared_memory_holds_the_largest_responses_of_every_model_twice(service: dict[str, Any]) -> None:
    largest_responses = 0
    for config_file in sorted((PROJECT_ROOT / "model_repository").glob("*/config.pbtxt")):
        config = config_file.read_text()
        batch_size = re.search(r"^max_batch_size:\s*(\d+)", config, re.MULTILINE)
        instance_group = re.search(r"^instance_group \[(.*?)\]", config, re.MULTILINE | re.DOTALL)
        assert batch_size, config_file
        assert instance_group, config_file
        sides = [int(match) for match in re.findall(r'key: "max_(?:width|height)" value: \{ string_value: "(\d+)"',
                                                     config)] or [DEFAULT_MAX_SIDE]
        instances = sum(int(count) for count in re.findall(r"count:\s*(\d+)", instance_group[1]))
        # Each instance's stub has its own region, grown to its largest response: a full batch of uint8 RGB images.
        largest_responses += instances * int(batch_size[1]) * max(sides) ** 2 * 3
    units = {"b": 1, "k": 1 << 10, "kb": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "g": 1 << 30, "gb": 1 << 30}
    match = re.fullmatch(r"(\d+)([a-z]*)", str(service["shm_size"]).lower())
    assert match, service["shm_size"]
    # Twice: a stub killed by the OOM killer leaves its region behind until the container restarts.
    assert int(match[1]) * units[match[2] or "b"] >= 2 * largest_responses


def test_compose_health_check_is_a_real_inference_by_a_command_that_exists(service: dict[str, Any]) -> None:
    check = service["healthcheck"]
    form, *command = check["test"]
    assert form == "CMD"
    assert command[:3] == ["python3", "-m", "triton_launcher.healthcheck"]
    arguments = healthcheck.parse_arguments(command[3:])
    seconds = {key: _seconds(check[key]) for key in ("interval", "timeout", "start_period")}
    assert seconds["timeout"] > arguments.timeout, "Docker must not kill the check before it reports"
    # The first start may download weights for as long as the launcher waits for readiness.
    assert seconds["start_period"] >= parse_arguments([]).ready_timeout
    assert check["retries"] >= 1


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m|h)", duration)
    assert match, duration
    return int(match[1]) * {"s": 1, "m": 60, "h": 3600}[match[2]]


def test_compose_gives_the_launcher_time_for_its_orderly_stop_before_docker_kills(service: dict[str, Any]) -> None:
    launcher = parse_arguments(container_launcher_arguments(service))
    grace = re.fullmatch(r"(\d+)s", str(service["stop_grace_period"]))
    assert grace is not None
    # The launcher's own bound: requests in flight, then the stubs; only then would it kill the group itself,
    # and reap it: docs/serving.md asks for 10 s more than those two.
    assert int(grace[1]) >= launcher.exit_timeout + STUB_EXIT_GRACE_S + 10
    assert service["init"] is True  # PID 1 passes docker stop's SIGTERM on


@pytest.mark.parametrize("python_version", ["3.10", "3.11"])
def test_every_dependency_has_exactly_one_exact_pin_when_resolved_for_a_python_version(python_version: str) -> None:
    pins: dict[str, list[str]] = {}
    extras = PYPROJECT["project"]["optional-dependencies"]
    for requirement in PYPROJECT["project"]["dependencies"] + [pin for pins in extras.values() for pin in pins]:
        if requirement.startswith(f"{PYPROJECT['project']['name']}["):
            continue  # an extra that includes others, e.g. dev = [triton-diffusers[server,bench], ...]
        specifier, _, marker = requirement.partition(";")
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)(\[[a-z,]+\])?==([0-9][0-9A-Za-z.+]*)\s*", specifier)
        assert match, f"{requirement!r} is not pinned with =="
        if marker and not _marker_holds(marker, python_version):
            continue
        pins.setdefault(match[1].lower(), []).append(match[3])
    assert all(len(versions) == 1 for versions in pins.values()), pins
    assert {"torch", "diffusers", "transformers", "numpy", "tritonclient"} <= set(pins)


def _marker_holds(marker: str, python_version: str) -> bool:
    match = re.fullmatch(r"\s*python_version\s*(>=|<)\s*'(\d+\.\d+)'\s*", marker)
    assert match, f"unexpected marker {marker!r}"
    version = tuple(int(part) for part in python_version.split("."))
    bound = tuple(int(part) for part in match[2].split("."))
    return version >= bound if match[1] == ">=" else version < bound
