"""Several Triton replicas behind the Helm chart's own HAProxy, on this machine's loopback.

What the chart deploys on a cluster, as far as one machine can hold it: each replica is ``python -m
triton_launcher`` (the container's command) with the one operator key (``--infer-key-file``), its load-balancer
agent (``--agent-port``, HTTP port + 3, the chart's rule) and a drain on stop (``--drain-seconds``); in front,
Debian's HAProxy runs the chart's ``haproxy.cfg``, rendered by Helm's engine with the replicas as static servers
on 127.0.0.1 (on a cluster they come from the headless Service through the cluster DNS). Used by
``tests/integration/test_replicas.py`` and ``scripts/bench --replicas``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import yaml

from inference_client.state import http_key_headers
from triton_launcher.paths import PROJECT_ROOT
from triton_launcher.server import LOOPBACK, free_port

from .haproxy import HAProxy

CHART = PROJECT_ROOT / "deploy" / "helm" / "triton-diffusers"
HTTP_BACKEND, GRPC_BACKEND = "triton-http", "triton-grpc"
AGENT_PORT_OFFSET = 3
"""The chart's rule: a replica's load-balancer agent listens on its HTTP port + 3 (gRPC + 1, metrics + 2)."""
PROXY_CHECKS = {"interval": "1s", "fastInterval": "500ms", "downInterval": "1s", "agentInterval": "250ms",
                "fall": 2, "rise": 1, "timeout": "10s"}
"""Health checks faster than the chart's defaults (10 s): a test should not wait minutes for a state change."""
START_TIMEOUT_S = 300.0
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port_run(count: int) -> int:
    """The first of ``count`` consecutive TCP ports free on loopback now (another process may take them later)."""
    for _ in range(200):
        first = free_port()
        if first + count > 65535:
            continue
        sockets: list[socket.socket] = []
        try:
            for port in range(first, first + count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.bind((LOOPBACK, port))
            return first
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports on {LOOPBACK}")


def render_chart(values: dict[str, Any]) -> list[dict[str, Any]]:
    """Every object the chart renders with ``values`` (Helm's own engine, through helm-python-sdk)."""
    from helm_python import chart as helm_chart

    with helm_chart.Chart.load(CHART) as chart:
        manifests = chart.render(values=values, name="local", namespace="default")
    return [document for path, text in manifests.items() if not path.endswith("/NOTES.txt")
            for document in yaml.safe_load_all(text) if document]


def proxy_config(replica_http_ports: list[int], http_port: int, grpc_port: int, stats_port: int,
                 model: str) -> str:
    """The chart's haproxy.cfg for replicas on loopback: the ConfigMap's text, nothing changed by hand."""
    values = {"proxy": {"staticServers": [f"{LOOPBACK}:{port}" for port in replica_http_ports],
                        "bindAddress": LOOPBACK, "ports": {"http": http_port, "grpc": grpc_port, "stats": stats_port},
                        "healthCheckModel": model, "healthCheck": PROXY_CHECKS}}
    [config_map] = [item for item in render_chart(values) if item["kind"] == "ConfigMap"
                    and "haproxy.cfg" in item.get("data", {})]
    return str(config_map["data"]["haproxy.cfg"])


class Replica:
    """One ``python -m triton_launcher`` as the chart's pod runs it, on four consecutive loopback ports."""

    def __init__(self, name: str, repository: Path, scratch: Path, key_file: Path, drain_seconds: float) -> None:
        self.name = name
        self.repository = repository
        self.key = key_file.read_text().strip()
        self.key_file = key_file
        self.drain_seconds = drain_seconds
        self.http_port = free_port_run(AGENT_PORT_OFFSET + 1)
        self.state_dir = scratch / f"{name}-state"
        self.log_path = scratch / f"{name}-launcher.log"
        self.process: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "triton_launcher", "--model-repository", str(self.repository),
                "--http-port", str(self.http_port), "--state-dir", str(self.state_dir),
                "--infer-key-file", str(self.key_file), "--agent-port", str(self.http_port + AGENT_PORT_OFFSET),
                "--drain-seconds", str(self.drain_seconds), "--watchdog-interval", "0",
                "--ready-timeout", str(int(START_TIMEOUT_S))]

    def start(self) -> None:
        """Start the launcher; returns at once (:meth:`wait_until_ready` waits for its READY line)."""
        self._forget_process()
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=log, text=True,
                                            start_new_session=True)

    def wait_until_ready(self) -> None:
        process = self.process
        assert process is not None
        assert process.stdout is not None
        line = process.stdout.readline().strip()  # the launcher's one line, or EOF if it failed
        if line != f"READY {self.url}":
            raise RuntimeError(f"replica {self.name} did not start ({line!r}):\n{self.log()}")

    def terminate(self) -> None:
        """SIGTERM, as the kubelet sends it: the launcher drains, then stops in order."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout_s)

    def kill(self) -> None:
        """SIGKILL to the launcher, tritonserver and every stub at once: a node or a pod that dies."""
        assert self.process is not None
        try:
            family = [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            family = []
        for member in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.send_signal(signal.SIGKILL)
        self.process.wait(timeout=60)
        psutil.wait_procs(family, timeout=60)

    def inference_count(self, model: str) -> int:
        """Triton's own count of the inferences this replica ran for ``model`` (its statistics API)."""
        request = urllib.request.Request(f"{self.url}/v2/models/{model}/stats",  # noqa: S310 - our loopback URL
                                         headers=http_key_headers(self.key))
        with _DIRECT.open(request, timeout=30) as response:
            statistics = json.load(response)
        return int(statistics["model_stats"][0]["inference_count"])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)
            process.send_signal(signal.SIGINT)  # a second signal ends a drain at once
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.kill()
        self._forget_process()

    def _forget_process(self) -> None:
        """Close the pipe of a launcher that has ended (a new start, or the end of the cluster)."""
        if self.process is not None and self.process.poll() is not None and self.process.stdout is not None:
            self.process.stdout.close()


class LocalCluster:
    """``replicas`` launchers with one key, and the chart's HAProxy in front of them (HTTP, gRPC, stats)."""

    def __init__(self, repository: Path, scratch: Path, replicas: int = 2, drain_seconds: float = 3.0,
                 check_model: str = "tiny-sd15") -> None:
        scratch.mkdir(parents=True, exist_ok=True)
        secret_dir = scratch / "secret"
        secret_dir.mkdir(mode=0o700, exist_ok=True)
        self.key_file = secret_dir / "infer-key"
        # As an operator makes it (docs/serving.md): one key for every replica and capability host.
        self.key_file.write_text(secrets.token_urlsafe(32) + "\n")
        os.chmod(self.key_file, 0o600)
        self.key = self.key_file.read_text().strip()
        self.replicas = [Replica(f"replica-{index + 1}", repository, scratch, self.key_file, drain_seconds)
                         for index in range(replicas)]
        self.proxy_http_port = free_port_run(2)
        self.proxy_grpc_port = self.proxy_http_port + 1
        self.stats_port = free_port()
        config = proxy_config([replica.http_port for replica in self.replicas], self.proxy_http_port,
                              self.proxy_grpc_port, self.stats_port, check_model)
        # The proxy's Deployment passes the key from the Secret in this variable; haproxy.cfg reads "${...}".
        self.proxy = HAProxy(config, {"TRITON_INFER_KEY": self.key}, scratch=scratch / "proxy")

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.proxy_http_port}"

    @property
    def grpc_address(self) -> str:
        return f"{LOOPBACK}:{self.proxy_grpc_port}"

    def server(self, replica: Replica) -> str:
        """HAProxy's name for ``replica`` (the chart names static servers triton1, triton2, … in order)."""
        return f"triton{self.replicas.index(replica) + 1}"

    def start(self) -> None:
        for replica in self.replicas:  # the launchers start together; each loads its models on its own
            replica.start()
        for replica in self.replicas:
            replica.wait_until_ready()
        self.proxy.start()
        for replica in self.replicas:
            self.wait_for_status(replica, "UP")

    def wait_for_status(self, replica: Replica, status: str, timeout_s: float = 60.0) -> None:
        for backend in (HTTP_BACKEND, GRPC_BACKEND):
            self.proxy.wait_for_status(backend, self.server(replica), status, timeout_s)

    def requests_sent(self, replica: Replica, backend: str = HTTP_BACKEND) -> int:
        """How many requests the proxy has sent ``replica`` (HAProxy's ``stot``; health checks not counted)."""
        return int(self.proxy.servers(backend)[self.server(replica)]["stot"])

    def stop(self) -> None:
        try:
            self.proxy.stop()
        finally:
            for replica in self.replicas:
                replica.stop()

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

