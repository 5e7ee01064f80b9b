"""The Helm chart (deploy/helm/triton-diffusers), rendered by Helm's own engine (helm-python-sdk, no cluster and no
helm binary) for the default values, the GPU production example and the capability service: lint clean, every
manifest valid for Kubernetes 1.30, the launcher run as the image runs it, probes that tell the truth, stops that
drain, a proxy configuration that Debian's HAProxy 2.6 accepts and that probes with the launcher's own inference,
and a capability service that alone reaches Triton, shares a PostgreSQL store and never holds a secret in clear."""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from inference_client import contract
from inference_client.state import INFER_KEY_HEADER
from triton_launcher import healthcheck
from triton_launcher.__main__ import ALL_INTERFACES, parse_arguments
from triton_launcher.paths import PROJECT_ROOT
from triton_launcher.server import GROUP_EXIT_WAIT_S, STUB_EXIT_GRACE_S

helm_chart = pytest.importorskip("helm_python.chart")  # dev extra only; the torch-free 3.10 check skips this file
helm_errors = pytest.importorskip("helm_python.errors")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
yaml = pytest.importorskip("yaml")

CHART = PROJECT_ROOT / "deploy" / "helm" / "triton-diffusers"
PRODUCTION_EXAMPLE = CHART / "examples" / "values-gpu-production.yaml"
KUBERNETES_VERSION = "1.30.0"
RELEASE, NAMESPACE = "rel", "ns"
LAUNCHER = ["python3", "-m", "triton_launcher"]
HEALTH_CHECK = ["python3", "-m", "triton_launcher.healthcheck"]
CLIENT_LABEL = {"triton-diffusers/capability-client": "true"}
HAPROXY = Path("/usr/sbin/haproxy")
SHM_BYTES_NEEDED = 2 << 30
"""docker/compose.yaml's shm_size (2gb), which tests/unit/test_deployment.py sizes from the models."""
QUANTITY_UNITS = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
SERVICE_DOCKERFILE = PROJECT_ROOT / "docker" / "Dockerfile.service"
SERVICE_STORE = "postgresql://capability@db.example.internal:6432/capabilities"
SERVICE_VALUES: dict[str, Any] = {"service": {"enabled": True, "store": {
    "url": SERVICE_STORE, "passwordSecret": {"name": "capability-store", "key": "password"}}}}
"""The capability service with nothing but what it cannot do without: the store and its password's Secret."""


def dockerfile_instructions(dockerfile: Path, instruction: str) -> list[str]:
    """The arguments of every ``instruction`` line (``FROM``, ``USER``, ...) of ``dockerfile``, continuations
    joined."""
    text = dockerfile.read_text().replace("\\\n", " ")
    return [line.split(None, 1)[1].strip() for line in text.splitlines() if line.startswith(f"{instruction} ")]


def dockerfile_user(dockerfile: Path) -> int:
    [user] = dockerfile_instructions(dockerfile, "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit(), "numeric, so that the kubelet can check runAsNonRoot"
    assert gid == uid
    return int(uid)


def dockerfile_entrypoint() -> list[str]:
    lines = [line for line in (PROJECT_ROOT / "docker" / "Dockerfile").read_text().splitlines()
             if line.startswith("ENTRYPOINT ")]
    assert len(lines) == 1, lines
    entrypoint = json.loads(lines[0].removeprefix("ENTRYPOINT "))
    assert isinstance(entrypoint, list)
    return [str(part) for part in entrypoint]


def render_manifests(values: dict[str, Any]) -> dict[str, str]:
    """The chart's rendered files with ``values``, by template path, NOTES.txt among them."""
    with helm_chart.Chart.load(CHART) as chart:
        manifests = chart.render(values=values, name=RELEASE, namespace=NAMESPACE)
    assert isinstance(manifests, dict)
    return manifests


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    """Every object the chart renders with ``values``, parsed."""
    return objects_of(render_manifests(values))


def objects_of(manifests: dict[str, str]) -> list[dict[str, Any]]:
    assert "Server URL" in notes_of(manifests), "what `helm install` prints"
    objects = [document for path, text in manifests.items() if not path.endswith("/NOTES.txt")
               for document in yaml.safe_load_all(text) if document]
    assert all(isinstance(item, dict) for item in objects)
    return objects


def notes_of(manifests: dict[str, str]) -> str:
    notes = [text for path, text in manifests.items() if path.endswith("/NOTES.txt")]
    assert len(notes) == 1
    return notes[0]


def render_error(values: dict[str, Any]) -> str:
    """The message with which rendering ``values`` fails."""
    with pytest.raises(helm_errors.HelmRenderError) as failure:
        render_manifests(values)
    return str(failure.value)


def merged(*layers: dict[str, Any]) -> dict[str, Any]:
    """Values ``layers`` merged as Helm merges -f files: maps key by key, anything else replaced."""
    result: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(result.get(key), dict):
                result[key] = merged(result[key], value)
            else:
                result[key] = value
    return result


def production_values() -> dict[str, Any]:
    values = yaml.safe_load(PRODUCTION_EXAMPLE.read_text())
    assert isinstance(values, dict)
    return values


VALUE_SETS = {"defaults": dict[str, Any](), "production": production_values(), "service": SERVICE_VALUES}


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def objects(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(VALUE_SETS[request.param])


@pytest.fixture(scope="module")
def defaults() -> list[dict[str, Any]]:
    return render({})


@pytest.fixture(scope="module")
def production() -> list[dict[str, Any]]:
    return render(production_values())


@pytest.fixture(scope="module", params=["service", "production"])
def with_service(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    """The objects of a value set with the capability service enabled."""
    return render(VALUE_SETS[request.param])


def only(objects: list[dict[str, Any]], kind: str, component: str | None = None) -> dict[str, Any]:
    found = list(of_kind(objects, kind, component))
    names = [item["metadata"]["name"] for item in found]
    assert len(found) == 1, f"one {kind} {component or ''} expected, found {names}"
    return found[0]


def of_kind(objects: list[dict[str, Any]], kind: str, component: str | None = None) -> Iterator[dict[str, Any]]:
    for item in objects:
        labels = item["metadata"].get("labels", {})
        if item["kind"] == kind and (component is None or labels.get("app.kubernetes.io/component") == component):
            yield item


def triton_pod(objects: list[dict[str, Any]]) -> dict[str, Any]:
    spec = only(objects, "Deployment", "triton")["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def triton_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    containers = triton_pod(objects)["containers"]
    assert [container["name"] for container in containers] == ["triton"]
    return dict(containers[0])


def launcher_arguments(objects: list[dict[str, Any]]) -> list[str]:
    """What the pod passes to the launcher: the image's ENTRYPOINT (the chart sets no command), then its args."""
    container = triton_container(objects)
    assert "command" not in container, "the image's ENTRYPOINT is the launcher; the chart only adds options"
    entrypoint = dockerfile_entrypoint()
    assert entrypoint[:len(LAUNCHER)] == LAUNCHER
    return [*entrypoint[len(LAUNCHER):], *container["args"]]


def environment(container: dict[str, Any]) -> dict[str, Any]:
    return {variable["name"]: variable.get("value", variable.get("valueFrom")) for variable in container["env"]}


def quantity_bytes(quantity: str) -> int:
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)", quantity)
    assert match, quantity
    return int(match[1]) * QUANTITY_UNITS[match[2]]


def volume_of_mount(pod: dict[str, Any], mount_path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(volumeMount, volume) of the container's mount at ``mount_path``."""
    mounts = [mount for mount in pod["containers"][0]["volumeMounts"] if mount["mountPath"] == mount_path]
    assert len(mounts) == 1, f"one mount at {mount_path}"
    volumes = [volume for volume in pod["volumes"] if volume["name"] == mounts[0]["name"]]
    assert len(volumes) == 1
    return mounts[0], volumes[0]


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m|h)", duration)
    assert match, duration
    return int(match[1]) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[match[2]]


# --- the chart as a whole ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_helm_lint_reports_no_errors_or_warnings(value_set: str) -> None:
    report = helm_chart.lint(CHART, VALUE_SETS[value_set], strict=True, namespace=NAMESPACE,
                             kube_version=f"v{KUBERNETES_VERSION}")
    problems = [message for message in report["messages"] if message["severity"] >= 2]
    assert report["errors"] == [], report
    assert problems == [], report["messages"]


def test_every_manifest_is_valid_for_kubernetes_1_30_and_custom_resources_are_checked_by_hand(
    objects: list[dict[str, Any]],
) -> None:
    custom = []
    for item in objects:
        try:
            kubernetes_validate.validate(item, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            custom.append(item)
    assert {item["kind"] for item in custom} <= {"ServiceMonitor"}, "only the Prometheus Operator's resource"
    for monitor in custom:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(monitor["spec"]) == {"selector", "namespaceSelector", "endpoints"}
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
            assert seconds(endpoint["scrapeTimeout"]) <= seconds(endpoint["interval"])
    kinds = sorted(item["kind"] for item in objects)
    assert {"Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "ConfigMap"} <= set(kinds)


def test_the_defaults_make_their_own_key_and_cache_and_production_uses_the_operators_secrets(
    defaults: list[dict[str, Any]], production: list[dict[str, Any]],
) -> None:
    secret = only(defaults, "Secret")
    key = base64.b64decode(secret["data"]["infer-key"]).decode()
    assert re.fullmatch(r"[A-Za-z0-9._~-]{24,512}", key), "a key the launcher's --infer-key-file accepts"
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert list(of_kind(production, "Secret")) == [], "the production example brings its own key"
    production_key = next(volume for volume in triton_pod(production)["volumes"] if volume["name"] == "infer-key")
    assert production_key["secret"]["secretName"] == production_values()["inferKey"]["existingSecret"]
    claim = only(production, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "several replicas on several nodes share the cache"
    assert quantity_bytes(claim["spec"]["resources"]["requests"]["storage"]) > quantity_bytes(
        only(defaults, "PersistentVolumeClaim")["spec"]["resources"]["requests"]["storage"])


# --- the Triton pods -----------------------------------------------------------------------------------------


def test_pods_run_the_images_launcher_with_the_shared_key_from_the_mounted_secret(
    objects: list[dict[str, Any]],
) -> None:
    launcher = vars(parse_arguments(launcher_arguments(objects)))
    # Options spelled in full: argparse would take an abbreviation that a later launcher option makes ambiguous.
    options = [arg for arg in triton_container(objects)["args"] if arg.startswith("--")]
    assert all(option[2:].replace("-", "_") in launcher for option in options), options
    image_defaults = vars(parse_arguments(dockerfile_entrypoint()[len(LAUNCHER):]))
    assert launcher["listen_address"] == ALL_INTERFACES, "the Services reach the pod's interface, not its loopback"
    assert str(launcher["log_file"]) == "-", "the log goes to the container's stderr (kubectl logs)"
    differing = {name for name in launcher if launcher[name] != image_defaults[name]}
    # The tritonserver flags, the watchdog and the repository stay the image's (and so scripts/serve's).
    assert differing <= {"infer_key_file", "exit_timeout", "ready_timeout", "http_port", "agent_port",
                         "drain_seconds"}, differing
    assert "infer_key_file" in differing
    key_file = Path(launcher["infer_key_file"])
    pod = triton_pod(objects)
    mount, volume = volume_of_mount(pod, str(key_file.parent))
    assert mount["readOnly"] is True
    assert volume["secret"]["items"] == [{"key": "infer-key", "path": key_file.name}]
    ports = {port["name"]: port["containerPort"] for port in triton_container(objects)["ports"]}
    assert ports == {"http": launcher["http_port"], "grpc": launcher["http_port"] + 1,
                     "metrics": launcher["http_port"] + 2, "agent": launcher["agent_port"]}


def test_a_model_repository_volume_replaces_the_baked_in_one(defaults: list[dict[str, Any]], tmp_path: Path) -> None:
    assert parse_arguments(launcher_arguments(defaults)).model_repository is None, "the image's own repository"
    claim = {"persistentVolumeClaim": {"claimName": "models"}}
    # The launcher's parser wants the directory to exist: a stand-in for the mount point here.
    objects = render({"triton": {"modelRepository": {"volume": claim, "mountPath": str(tmp_path)}}})
    repository = parse_arguments(launcher_arguments(objects)).model_repository
    mount, volume = volume_of_mount(triton_pod(objects), str(repository))
    assert mount["readOnly"] is True
    assert volume["persistentVolumeClaim"] == claim["persistentVolumeClaim"]


def test_gpus_weights_state_and_token_are_where_the_image_expects_them(objects: list[dict[str, Any]]) -> None:
    pod = triton_pod(objects)
    container = triton_container(objects)
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    env = environment(container)
    _, cache = volume_of_mount(pod, env["HF_HOME"])
    assert env["HF_HOME"] == "/models/hf-cache"  # docker/Dockerfile's HF_HOME
    claims = {claim["metadata"]["name"] for claim in of_kind(objects, "PersistentVolumeClaim")}
    assert cache["persistentVolumeClaim"]["claimName"] in claims
    # The state dir is a subdirectory of an emptyDir: the launcher makes it 0700 for itself, while the
    # emptyDir's own root belongs to root with mode 0777, which the launcher rightly refuses to trust.
    state = Path(env["TRITON_DIFFUSERS_STATE"])
    _, state_volume = volume_of_mount(pod, str(state.parent))
    assert str(state.parent) == "/var/lib/triton-diffusers"
    assert state_volume["emptyDir"] == {}
    token = env.get("HF_TOKEN")
    if token is not None:
        assert set(token) == {"secretKeyRef"}, "the token comes from a Secret, never from the values"


def test_shared_memory_is_a_memory_backed_emptydir_as_large_as_composes(objects: list[dict[str, Any]]) -> None:
    _, shm = volume_of_mount(triton_pod(objects), "/dev/shm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert quantity_bytes(shm["emptyDir"]["sizeLimit"]) >= SHM_BYTES_NEEDED


def test_probes_tell_the_truth_and_nothing_kills_a_busy_pod(objects: list[dict[str, Any]]) -> None:
    container = triton_container(objects)
    launcher = parse_arguments(launcher_arguments(objects))
    assert "livenessProbe" not in container, "the launcher's watchdog restarts a faulty server; a busy one is alive"
    for name in ("startupProbe", "readinessProbe"):
        probe = container[name]
        command = probe["exec"]["command"]
        assert command[:len(HEALTH_CHECK)] == HEALTH_CHECK, f"{name}: a real inference on every model"
        check = healthcheck.parse_arguments(command[len(HEALTH_CHECK):])
        assert probe["timeoutSeconds"] > check.timeout, f"{name}: the kubelet must not cut the check short"
    startup = container["startupProbe"]
    # The launcher's own time-out (which logs why) must come before the kubelet gives up on the pod.
    assert startup["periodSeconds"] * startup["failureThreshold"] > launcher.ready_timeout
    assert startup["periodSeconds"] * startup["failureThreshold"] <= launcher.ready_timeout + 600


def test_a_stop_lets_generations_in_flight_finish_before_the_kubelet_kills(objects: list[dict[str, Any]]) -> None:
    pod = triton_pod(objects)
    launcher = parse_arguments(launcher_arguments(objects))
    container = pod["containers"][0]
    # The launcher drains by itself (its agent says "drain" to the proxy while it serves on); no preStop hook
    # delays the SIGTERM that starts it.
    assert "preStop" not in container.get("lifecycle", {})
    assert launcher.drain_seconds >= 5, "endpoints, the cluster DNS (5 s TTL) and the proxy need time to forget it"
    assert launcher.agent_port == launcher.http_port + 3
    assert {"name": "agent", "containerPort": launcher.agent_port, "protocol": "TCP"} in container["ports"]
    # The grace period counts from SIGTERM: the drain, then the launcher's orderly stop (requests in flight, the
    # stubs' exit, the group gone), all before SIGKILL.
    assert pod["terminationGracePeriodSeconds"] > (launcher.drain_seconds + launcher.exit_timeout
                                                    + STUB_EXIT_GRACE_S + GROUP_EXIT_WAIT_S)


def test_updates_and_disruptions_never_take_the_last_serving_replica(objects: list[dict[str, Any]]) -> None:
    deployment = only(objects, "Deployment", "triton")
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] >= 1
    budget = only(objects, "PodDisruptionBudget", "triton")
    assert budget["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert budget["spec"].get("maxUnavailable") == 1 or budget["spec"].get("minAvailable") == 1


def test_pods_run_unprivileged_on_a_read_only_root(objects: list[dict[str, Any]]) -> None:
    users = {"triton": 1000, "proxy": 99, "capability-service": dockerfile_user(SERVICE_DOCKERFILE)}
    components = [item["metadata"]["labels"]["app.kubernetes.io/component"] for item in of_kind(objects, "Deployment")]
    assert {"triton", "proxy"} <= set(components) <= set(users)
    for component in components:
        user = users[component]
        pod = only(objects, "Deployment", component)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == user  # the image's own user (triton: docker/Dockerfile)
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert context["readOnlyRootFilesystem"] is True
    pod = triton_pod(objects)
    writable = {mount["mountPath"] for mount in pod["containers"][0]["volumeMounts"] if not mount.get("readOnly")}
    assert writable == {"/tmp", "/dev/shm", "/var/lib/triton-diffusers", "/models/hf-cache"}
    env = environment(pod["containers"][0])
    assert all(env[name].startswith("/tmp/") for name in ("XDG_CACHE_HOME", "CUDA_CACHE_PATH"))


# --- the network, metrics and autoscaling --------------------------------------------------------------------


def ingress_rules(policy: dict[str, Any]) -> dict[tuple[str, ...], list[dict[str, Any]]]:
    """A NetworkPolicy's ingress peers by the (sorted) ports they may reach."""
    return {tuple(sorted(port["port"] for port in rule["ports"])): rule["from"] for rule in policy["spec"]["ingress"]}


def pod_labels(objects: list[dict[str, Any]], component: str) -> dict[str, str]:
    labels = only(objects, "Deployment", component)["spec"]["template"]["metadata"]["labels"]
    assert isinstance(labels, dict)
    return labels


def admits(peer: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a NetworkPolicy peer without a namespaceSelector selects pods with ``labels`` (matchLabels only:
    the chart writes no matchExpressions)."""
    assert set(peer) == {"podSelector"}, peer
    selector = peer["podSelector"]
    assert set(selector) == {"matchLabels"}, selector
    return bool(selector["matchLabels"].items() <= labels.items())


def test_only_capability_clients_and_the_proxy_reach_triton_and_metrics_only_from_monitoring(
    objects: list[dict[str, Any]],
) -> None:
    policy = only(objects, "NetworkPolicy", "triton")
    triton_labels = only(objects, "Deployment", "triton")["spec"]["selector"]["matchLabels"]
    proxy_labels = only(objects, "Deployment", "proxy")["spec"]["selector"]["matchLabels"]
    service = list(of_kind(objects, "Deployment", "capability-service"))
    # The capability clients: the service's pods when it runs (and then only they), else the labelled hosts.
    clients = service[0]["spec"]["selector"]["matchLabels"] if service else CLIENT_LABEL
    assert policy["spec"]["podSelector"]["matchLabels"] == triton_labels
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = ingress_rules(policy)
    assert set(rules) == {("grpc", "http"), ("agent",), ("metrics",)}, "nothing else is open"
    api_peers = rules[("grpc", "http")]
    assert {"podSelector": {"matchLabels": clients}} in api_peers
    assert {"podSelector": {"matchLabels": proxy_labels}} in api_peers
    for peer in api_peers:  # a peer in another namespace must still be a labelled client
        assert peer["podSelector"]["matchLabels"] in (clients, proxy_labels)
    assert rules[("agent",)] == [{"podSelector": {"matchLabels": proxy_labels}}], "the agent answers the proxy alone"
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    assert rules[("metrics",)] == [monitoring]
    proxy_policy = only(objects, "NetworkPolicy", "proxy")
    assert proxy_policy["spec"]["podSelector"]["matchLabels"] == proxy_labels
    proxy_rules = ingress_rules(proxy_policy)
    assert set(proxy_rules) == {("grpc", "http"), ("stats",)}
    assert all(peer["podSelector"]["matchLabels"] == clients for peer in proxy_rules[("grpc", "http")])


def test_services_expose_http_grpc_and_metrics_and_a_headless_one_lists_ready_replicas(
    objects: list[dict[str, Any]],
) -> None:
    triton_labels = only(objects, "Deployment", "triton")["spec"]["selector"]["matchLabels"]
    service = only(objects, "Service", "triton")
    ports = {port["name"]: port for port in service["spec"]["ports"]}
    assert {name: port["port"] for name, port in ports.items()} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert ports["grpc"]["appProtocol"] == "grpc"
    headless = only(objects, "Service", "triton-replicas")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is False
    assert service["spec"]["selector"] == headless["spec"]["selector"] == triton_labels
    monitor = only(objects, "ServiceMonitor", "triton")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert not monitor["spec"]["selector"]["matchLabels"].items() <= headless["metadata"]["labels"].items(), \
        "each replica scraped once, through one Service"
    assert [endpoint["port"] for endpoint in monitor["spec"]["endpoints"]] == ["metrics"]


def test_production_autoscales_on_queue_time_and_scales_down_slower_than_a_model_load(
    defaults: list[dict[str, Any]], production: list[dict[str, Any]],
) -> None:
    assert list(of_kind(defaults, "HorizontalPodAutoscaler")) == [], "the defaults need no Prometheus adapter"
    assert "replicas" in only(defaults, "Deployment", "triton")["spec"]
    scaler = only(production, "HorizontalPodAutoscaler", "triton")
    deployment = only(production, "Deployment", "triton")
    assert "replicas" not in deployment["spec"], "an upgrade must not reset what the autoscaler chose"
    assert scaler["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                "name": deployment["metadata"]["name"]}
    assert 2 <= scaler["spec"]["minReplicas"] < scaler["spec"]["maxReplicas"] <= 8
    [metric] = scaler["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "triton_queue_time_per_request_us"
    assert metric["pods"]["target"]["type"] == "AverageValue"
    launcher = parse_arguments(launcher_arguments(production))
    behavior = scaler["spec"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] > launcher.ready_timeout
    assert all(policy["type"] == "Pods" and policy["value"] == 1 for policy in behavior["scaleUp"]["policies"])
    # The rule that defines the metric ships in the chart's README, over Triton's own counters.
    readme = (CHART / "README.md").read_text()
    assert "triton_queue_time_per_request_us" in readme
    assert "nv_inference_queue_duration_us" in readme
    assert "nv_inference_request_success" in readme


def test_production_schedules_on_gpu_nodes(production: list[dict[str, Any]]) -> None:
    pod = triton_pod(production)
    assert pod["nodeSelector"]
    assert any(toleration["key"] == "nvidia.com/gpu" for toleration in pod["tolerations"])
    assert environment(pod["containers"][0])["HF_TOKEN"] == {
        "secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}}


# --- the proxy -----------------------------------------------------------------------------------------------


def haproxy_config(objects: list[dict[str, Any]]) -> str:
    config = only(objects, "ConfigMap", "proxy")["data"]["haproxy.cfg"]
    assert isinstance(config, str)
    return config


def config_lines(config: str, section: str) -> list[str]:
    """The directives of one section (``backend triton-http``), comments left out."""
    lines: list[str] = []
    inside = False
    for line in config.splitlines():
        if line and not line[0].isspace():
            inside = line.strip() == section
            continue
        if inside and line.strip() and not line.strip().startswith("#"):
            lines.append(line.strip())
    assert lines, f"no section {section!r}"
    return lines


def test_proxy_health_check_is_the_launchers_probe_inference_with_the_key(defaults: list[dict[str, Any]]) -> None:
    pytest.importorskip("tritonclient")
    from tritonclient.utils import np_to_triton_dtype

    probe = contract.TextToImage("readiness probe", width=64, height=64, num_inference_steps=1, seed=0).arrays()
    for backend in ("triton-http", "triton-grpc"):
        [send] = [line for line in config_lines(haproxy_config(defaults), f"backend {backend}")
                  if line.startswith("http-check send ")]
        words = shlex.split(send)
        headers = {words[index + 1].lower(): words[index + 2] for index, word in enumerate(words) if word == "hdr"}
        assert words[words.index("meth") + 1] == "POST"
        assert words[words.index("uri") + 1] == "/v2/models/sd15/infer"
        assert headers[INFER_KEY_HEADER] == "${TRITON_INFER_KEY}"
        assert headers["content-type"] == "application/json"
        body = json.loads(words[words.index("body") + 1])
        inputs = {tensor["name"]: tensor for tensor in body["inputs"]}
        assert set(inputs) == set(probe)
        for name, array in probe.items():
            assert inputs[name]["shape"] == list(array.shape), name
            assert inputs[name]["datatype"] == np_to_triton_dtype(array.dtype), name
            expected = [item.decode() if isinstance(item, bytes) else item for item in array.reshape(-1).tolist()]
            assert inputs[name]["data"] == expected, name
        assert [output["name"] for output in body["outputs"]] == [contract.IMAGE]
        # An answer, or Triton's queue refusing the check (503: busy, not broken), as the watchdog judges.
        assert "http-check expect rstatus ^(200|503)$" in config_lines(haproxy_config(defaults), f"backend {backend}")


def test_proxy_balances_requests_and_retries_only_what_is_safe(defaults: list[dict[str, Any]]) -> None:
    config = haproxy_config(defaults)
    http = config_lines(config, "backend triton-http")
    grpc = config_lines(config, "backend triton-grpc")
    assert "balance leastconn" in http
    assert "balance leastconn" in grpc
    assert "option http-server-close" in http, "no idle connection holds a replica's stop up"
    assert "retry-on conn-failure empty-response junk-response response-timeout 503" in http
    assert "http-request disable-l7-retry unless { req.hdr(Idempotency-Key) -m found }" in http
    assert "retry-on conn-failure" in grpc, "a gRPC stream that reached a replica is never replayed"
    assert "option redispatch 1" in config_lines(config, "defaults"), "every retry on another replica"
    assert any(line.startswith("bind :8001 proto h2") for line in config_lines(config, "frontend triton-grpc"))
    # Discovered from the headless Service through the cluster DNS, a slot for every replica a rollout may have.
    headless = only(defaults, "Service", "triton-replicas")["metadata"]["name"]
    [template] = [line for line in grpc if line.startswith("server-template ")]
    assert f"{headless}.{NAMESPACE}.svc.cluster.local:8001" in template
    assert " proto h2 check-proto h1 port 8000 " in template
    assert template.split()[2] == "1-2", "one replica and the rollout's surge"
    # Every replica's own word on whether it is ready, draining or down: the launcher's agent, HTTP port + 3.
    for backend in (http, grpc):
        default_server = next(line for line in backend if line.startswith("default-server "))
        assert " agent-check agent-port 8003 agent-inter 1s " in default_server
    proxy = only(defaults, "Deployment", "proxy")["spec"]["template"]
    env = environment(proxy["spec"]["containers"][0])
    key_secret = next(volume for volume in triton_pod(defaults)["volumes"] if volume["name"] == "infer-key")
    assert env["TRITON_INFER_KEY"] == {"secretKeyRef": {"name": key_secret["secret"]["secretName"],
                                                        "key": "infer-key"}}
    assert "checksum/haproxy-cfg" in proxy["metadata"]["annotations"]


STATIC_PROXY = {"proxy": {"staticServers": ["127.0.0.1:18000", "127.0.0.1:19000"], "bindAddress": "127.0.0.1",
                          "ports": {"http": 28000, "grpc": 28001, "stats": 28404},
                          "healthCheckModel": "tiny-sd15"}}


def test_static_servers_replace_discovery_for_a_local_proxy() -> None:
    config = haproxy_config(render(STATIC_PROXY))
    assert "resolvers" not in config
    assert config_lines(config, "frontend triton-http")[0] == "bind 127.0.0.1:28000"
    servers = [line for line in config_lines(config, "backend triton-grpc") if line.startswith("server ")]
    assert servers == ["server triton1 127.0.0.1:18001 proto h2 check-proto h1 port 18000 agent-port 18003",
                       "server triton2 127.0.0.1:19001 proto h2 check-proto h1 port 19000 agent-port 19003"]
    assert [line for line in config_lines(config, "backend triton-http") if line.startswith("server ")] == [
        "server triton1 127.0.0.1:18000 agent-port 18003", "server triton2 127.0.0.1:19000 agent-port 19003"]
    assert "/v2/models/tiny-sd15/infer" in config


@pytest.mark.skipif(not HAPROXY.exists(), reason="Debian's haproxy is not installed")
@pytest.mark.parametrize("values", [STATIC_PROXY, {}], ids=["static-servers", "cluster-dns"])
def test_rendered_haproxy_config_is_valid_for_haproxy_2_6(values: dict[str, Any], tmp_path: Path) -> None:
    config_file = tmp_path / "haproxy.cfg"
    config_file.write_text(haproxy_config(render(values)))
    checked = subprocess.run([str(HAPROXY), "-c", "-f", str(config_file)], capture_output=True, text=True,
                             env={**os.environ, "TRITON_INFER_KEY": "k" * 32}, timeout=30, check=False)
    report = checked.stdout + checked.stderr
    assert checked.returncode == 0, report
    assert "[WARNING]" not in report, report
    assert "[ALERT]" not in report, report


def test_proxy_drains_longer_than_its_server_timeout_allows(objects: list[dict[str, Any]]) -> None:
    config = haproxy_config(objects)
    hard_stop = next(line for line in config_lines(config, "global") if line.startswith("hard-stop-after "))
    server_timeout = next(line for line in config_lines(config, "defaults") if line.startswith("timeout server "))
    pod = only(objects, "Deployment", "proxy")["spec"]["template"]["spec"]
    pre_stop_s = int(pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][1])
    assert seconds(hard_stop.split()[1]) >= seconds(server_timeout.split()[2])
    assert pod["terminationGracePeriodSeconds"] > pre_stop_s + seconds(hard_stop.split()[1])


# --- the capability service ----------------------------------------------------------------------------------


def service_pod(objects: list[dict[str, Any]]) -> dict[str, Any]:
    spec = only(objects, "Deployment", "capability-service")["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def service_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    containers = service_pod(objects)["containers"]
    assert [container["name"] for container in containers] == ["capability"]
    return dict(containers[0])


def option_values(args: list[str], option: str) -> list[str]:
    """Every value given to ``option`` in ``args`` (``--option VALUE``, repeatable)."""
    return [args[index + 1] for index, arg in enumerate(args) if arg == option]


def test_the_service_is_off_by_default_and_defaults_keep_the_labelled_clients(defaults: list[dict[str, Any]]) -> None:
    # On by default it would need a store no default can name, and it would lock the existing hosts out of Triton.
    assert not [item for item in defaults
                if item["metadata"]["labels"].get("app.kubernetes.io/component") == "capability-service"]
    assert "Capability service" in notes_of(render_manifests(SERVICE_VALUES))
    assert "Capability service" not in notes_of(render_manifests({}))


def test_service_runs_serve_on_all_interfaces_with_the_store_from_the_environment(
    with_service: list[dict[str, Any]],
) -> None:
    container = service_container(with_service)
    assert container["command"] == ["python", "-m", "capability"]
    args = container["args"]
    assert args[0] == "serve"
    assert option_values(args, "--host") == ["0.0.0.0"], "the Service reaches the pod's interface, not its loopback"
    [port] = option_values(args, "--port")
    assert container["ports"] == [{"name": "http", "containerPort": int(port), "protocol": "TCP"}]
    # The store from CAPABILITY_STORE alone: no URL on the command line, where `ps` and the logs would show it.
    assert "--store" not in args
    env = environment(container)
    assert env["CAPABILITY_STORE"].startswith("postgresql://")
    service = only(with_service, "Service", "capability-service")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [{"name": "http", "port": int(port), "targetPort": "http", "protocol": "TCP",
                                         "appProtocol": "http"}]
    assert service["spec"]["selector"].items() <= service_pod_labels(with_service).items()
    # The CLI's state dir is the one the image makes private to the service's user, off $HOME.
    [state] = [value.split("=", 1)[1] for value in dockerfile_instructions(SERVICE_DOCKERFILE, "ENV")
               if value.startswith("TRITON_DIFFUSERS_STATE=")]
    assert env["TRITON_DIFFUSERS_STATE"] == state


def service_pod_labels(objects: list[dict[str, Any]]) -> dict[str, str]:
    return pod_labels(objects, "capability-service")


def test_service_arguments_are_ones_the_capability_cli_accepts() -> None:
    from capability.__main__ import build_parser

    objects = render(merged(SERVICE_VALUES, {"service": {
        "trustedHeader": {"name": "X-Authenticated-User", "proxies": ["10.0.0.0/8", "192.168.0.0/16"]},
        "forwardedAllowIps": ["10.244.0.0/16"], "gracefulSeconds": 300,
        "extraArgs": ["--max-body-bytes", "131072"]}}))
    container = service_container(objects)
    args = container["args"]
    assert args[-2:] == ["--max-body-bytes", "131072"]
    assert container["command"][-2:] == ["-m", "capability"]
    # Options spelled in full: argparse would take an abbreviation that a later option makes ambiguous.
    options = [arg[2:].replace("-", "_") for arg in args if arg.startswith("--")]
    parsed = vars(build_parser().parse_args(args))
    assert set(options) <= set(parsed), options
    assert parsed["command"] == "serve"
    assert parsed["host"] == "0.0.0.0"
    assert parsed["port"] == 8080
    assert parsed["graceful_seconds"] == 300
    assert parsed["trusted_header"] == "X-Authenticated-User"
    assert parsed["trusted_proxy"] == ["10.0.0.0/8", "192.168.0.0/16"]
    assert parsed["forwarded_allow_ips"] == ["10.244.0.0/16"]
    assert parsed["max_body_bytes"] == 131072
    assert parsed["store"] is None, "serve takes CAPABILITY_STORE from the environment"


def test_service_probes_ask_the_store_for_readiness_and_the_process_for_liveness(
    with_service: list[dict[str, Any]],
) -> None:
    container = service_container(with_service)
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    # A store outage makes every instance unready; it must not get them killed as well.
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 30


def test_service_stop_lets_the_longest_request_through_the_proxy_finish(with_service: list[dict[str, Any]]) -> None:
    pod = service_pod(with_service)
    pre_stop = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # Long enough for the endpoints to reach kube-proxy and the ingress controller, short beside the grace period.
    assert 1 <= int(pre_stop[1]) <= 15
    server_timeout = next(line for line in config_lines(haproxy_config(with_service), "defaults")
                          if line.startswith("timeout server "))
    [graceful] = option_values(pod["containers"][0]["args"], "--graceful-seconds")
    # Running requests may finish for as long as the proxy lets a generation run; the kubelet's grace period runs
    # from the preStop hook: the sleep, then that, then the service's own stop, all before SIGKILL.
    assert float(graceful) >= seconds(server_timeout.split()[2])
    assert pod["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + float(graceful) + 10
    rollout = only(with_service, "Deployment", "capability-service")["spec"]["strategy"]["rollingUpdate"]
    assert rollout["maxUnavailable"] == 0
    budget = only(with_service, "PodDisruptionBudget", "capability-service")
    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"].items() <= service_pod_labels(with_service).items()


def test_service_hpa_scales_the_service_deployment_on_cpu(with_service: list[dict[str, Any]]) -> None:
    deployment = only(with_service, "Deployment", "capability-service")
    scaler = only(with_service, "HorizontalPodAutoscaler", "capability-service")
    assert scaler["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                "name": deployment["metadata"]["name"]}
    assert "replicas" not in deployment["spec"], "an upgrade must not reset what the autoscaler chose"
    assert 2 <= scaler["spec"]["minReplicas"] < scaler["spec"]["maxReplicas"]
    [metric] = scaler["spec"]["metrics"]
    assert metric["type"] == "Resource"
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert "cpu" in service_container(with_service)["resources"]["requests"], "utilisation is of the request"
    fixed = render(merged(SERVICE_VALUES, {"service": {"autoscaling": {"enabled": False}, "replicas": 3}}))
    assert list(of_kind(fixed, "HorizontalPodAutoscaler", "capability-service")) == []
    assert only(fixed, "Deployment", "capability-service")["spec"]["replicas"] == 3


def test_service_mounts_the_infer_key_at_the_path_the_registered_servers_name(
    with_service: list[dict[str, Any]],
) -> None:
    pod = service_pod(with_service)
    key_dir = "/var/run/secrets/triton"  # the --key-file of register-server in docs/kubernetes.md
    mount, volume = volume_of_mount(pod, key_dir)
    assert mount["readOnly"] is True
    triton_key = next(volume for volume in triton_pod(with_service)["volumes"] if volume["name"] == "infer-key")
    assert volume["secret"]["secretName"] == triton_key["secret"]["secretName"], "the key the replicas serve with"
    assert volume["secret"]["items"] == [{"key": "infer-key", "path": "infer-key"}]
    # Readable through the pod's group; read_infer_key_file refuses a key file that others may write.
    assert volume["secret"]["defaultMode"] & 0o022 == 0
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]


def test_notes_register_the_key_file_the_pods_mount_and_issue_a_token() -> None:
    values = merged(SERVICE_VALUES, {"service": {"inferKeyDir": "/var/run/secrets/elsewhere"}})
    notes = notes_of(render_manifests(values))
    deployment = only(render(values), "Deployment", "capability-service")["metadata"]["name"]
    commands = [shlex.split(line) for line in notes.splitlines() if "python -m capability" in line]
    exec_prefix = ["kubectl", "-n", NAMESPACE, "exec", f"deploy/{deployment}", "--", "python", "-m", "capability"]
    assert all(command[:len(exec_prefix)] == exec_prefix for command in commands), commands
    by_name = {command[len(exec_prefix)]: command[len(exec_prefix) + 1:] for command in commands}
    assert set(by_name) == {"init", "register-server", "token"}
    register = by_name["register-server"]
    assert option_values(register, "--key-file") == ["/var/run/secrets/elsewhere/infer-key"]
    proxy = only(render(values), "Service", "proxy")["metadata"]["name"]
    assert option_values(register, "--url") == [f"http://{proxy}.{NAMESPACE}:8000"]
    assert option_values(register, "--grpc-address") == [f"{proxy}.{NAMESPACE}:8001"]
    assert by_name["token"][:2] == ["issue", "--as"]
    assert f"http://{deployment}.{NAMESPACE}:8080" in notes


@pytest.mark.parametrize(("values", "expected"), [
    ({}, "service.store.url is required"),
    ({"replicas": 3, "autoscaling": {"enabled": False}, "store": {"url": "sqlite:///var/lib/capabilities.sqlite3"}},
     "SQLite store (sqlite:///var/lib/capabilities.sqlite3), which lives in one pod's file and cannot be shared: "
     "the capability service's instances (service.replicas=3)"),
    ({"store": {"url": "sqlite:///var/lib/capabilities.sqlite3"}}, "service.autoscaling.maxReplicas=10"),
    ({"store": {"url": "mysql://capability@db/capabilities"}}, 'must be a PostgreSQL store'),
    ({"store": {"url": "postgresql://capability@db/capabilities", "passwordSecret": {"name": "a"},
                "passfileSecret": {"name": "b"}}}, "both set"),
    ({"store": {"url": "postgresql://capability@db/capabilities"}, "trustedHeader": {"name": "X-User"}},
     "service.trustedHeader.proxies is empty"),
    ({"store": {"url": "postgresql://capability@db/capabilities"}, "resources": {"requests": {"cpu": None}}},
     "set service.resources.requests.cpu"),
], ids=["no-store", "sqlite-replicas", "sqlite-autoscaled", "not-postgresql", "two-passwords", "header-from-anyone",
        "hpa-without-cpu-request"])
def test_service_refuses_values_it_cannot_run_with(values: dict[str, Any], expected: str) -> None:
    message = render_error({"service": {"enabled": True, **values}})
    assert expected in message


def test_no_secret_value_appears_in_clear_in_any_manifest() -> None:
    password = "s3cret-Pa55word"  # a stand-in that must never reach a manifest
    message = render_error(merged(SERVICE_VALUES, {"service": {"store": {
        "url": f"postgresql://capability:{password}@db:5432/capabilities"}}}))
    assert "holds a password" in message
    assert password not in message
    for values in (SERVICE_VALUES, merged(SERVICE_VALUES, {"service": {"store": {
            "passwordSecret": {"name": ""}, "passfileSecret": {"name": "capability-pgpass"}}}})):
        manifests = render_manifests(values)
        objects = objects_of(manifests)  # one rendering: each makes a new random key
        # The key the chart makes is in its Secret, base64-encoded, and nowhere else, in no form.
        encoded = only(objects, "Secret")["data"]["infer-key"]
        key = base64.b64decode(encoded).decode()
        text = "\n".join(manifests.values())
        assert key not in text
        assert text.count(encoded) == 1
        for item in objects:
            pod = item["spec"]["template"]["spec"] if item["kind"] == "Deployment" else None
            for container in [] if pod is None else [*pod.get("initContainers", []), *pod["containers"]]:
                for variable in container.get("env", []):
                    if re.search(r"PASSWORD|KEY|TOKEN|SECRET", variable["name"]):
                        assert set(variable) == {"name", "valueFrom"}, variable
                        assert set(variable["valueFrom"]) == {"secretKeyRef"}, variable
        env = environment(service_container(objects))
        if "PGPASSWORD" in env:
            assert env["PGPASSWORD"] == {"secretKeyRef": {"name": "capability-store", "key": "password"}}
        else:
            assert "PGPASSFILE" in env


def test_a_password_file_reaches_libpq_private_to_the_services_user() -> None:
    objects = render(merged(SERVICE_VALUES, {"service": {"store": {
        "passwordSecret": {"name": ""}, "passfileSecret": {"name": "capability-pgpass", "key": "pgpass"}}}}))
    pod = service_pod(objects)
    env = environment(service_container(objects))
    assert "PGPASSWORD" not in env
    passfile = Path(env["PGPASSFILE"])
    mount, volume = volume_of_mount(pod, str(passfile.parent))
    assert mount["readOnly"] is True
    assert volume["emptyDir"]["medium"] == "Memory"
    # libpq ignores a password file its group may read, and a Secret's files are the pod group's: a copy, 0600, of
    # the service's own user (the init container runs as the pod's user).
    [init] = pod["initContainers"]
    command = init["command"]
    assert command[:3] == ["install", "-m", "0600"]
    source, target = Path(command[3]), Path(command[4])
    assert target == passfile
    init_mounts = {mount["mountPath"]: mount for mount in init["volumeMounts"]}
    assert init_mounts[str(source.parent)]["readOnly"] is True
    secret = next(volume for volume in pod["volumes"] if volume["name"] == init_mounts[str(source.parent)]["name"])
    assert secret["secret"]["secretName"] == "capability-pgpass"
    assert secret["secret"]["items"] == [{"key": "pgpass", "path": source.name}]
    assert init_mounts[str(target.parent)]["name"] == mount["name"]
    assert init["image"] == service_container(objects)["image"]


@pytest.mark.parametrize("direct_clients", [False, True])
def test_triton_and_the_proxy_admit_the_service_and_labelled_hosts_only_through_the_escape_hatch(
    direct_clients: bool,
) -> None:
    objects = render(merged(SERVICE_VALUES, {"networkPolicy": {"directClients": direct_clients,
                                                                "clientNamespaces": ["apps"]}}))
    service_labels = service_pod_labels(objects)
    host_labels = {**CLIENT_LABEL, "app": "web"}
    for component in ("triton", "proxy"):
        peers = ingress_rules(only(objects, "NetworkPolicy", component))[("grpc", "http")]
        same_namespace = [peer for peer in peers if "namespaceSelector" not in peer]
        assert any(admits(peer, service_labels) for peer in same_namespace), component
        assert any(admits(peer, host_labels) for peer in same_namespace) is direct_clients, component
        other_namespaces = [peer for peer in peers if "namespaceSelector" in peer]
        assert bool(other_namespaces) is direct_clients, "the labelled hosts of clientNamespaces follow the same rule"
    # The service's pods carry no client label: the label stays the escape hatch's, not a way in for anything else.
    assert not CLIENT_LABEL.items() <= service_labels.items()


def egress_rules(policy: dict[str, Any]) -> list[tuple[set[tuple[int, str]], list[dict[str, Any]] | None]]:
    return [({(port["port"], port["protocol"]) for port in rule["ports"]}, rule.get("to"))
            for rule in policy["spec"]["egress"]]


def container_ports(objects: list[dict[str, Any]], component: str) -> dict[str, int]:
    [container] = only(objects, "Deployment", component)["spec"]["template"]["spec"]["containers"]
    return {port["name"]: port["containerPort"] for port in container["ports"]}


def test_service_network_policy_reaches_triton_the_proxy_the_store_and_dns_only(
    with_service: list[dict[str, Any]],
) -> None:
    policy = only(with_service, "NetworkPolicy", "capability-service")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= service_pod_labels(with_service).items()
    assert sorted(policy["spec"]["policyTypes"]) == ["Egress", "Ingress"]
    [(ports, callers)] = ingress_rules(policy).items()
    assert ports == ("http",)
    assert {"podSelector": {"matchLabels": CLIENT_LABEL}} in callers, "the hosts that called Triton call the service"
    rules = egress_rules(policy)
    by_target: dict[str, set[tuple[int, str]]] = {}
    for ports_, peers in rules:
        for component in ("triton", "proxy"):
            if peers and any("podSelector" in peer and "namespaceSelector" not in peer
                             and admits(peer, pod_labels(with_service, component)) for peer in peers):
                by_target[component] = ports_
    # Egress is judged on the pod's own port after the Service's translation: the containers' ports.
    for component in ("triton", "proxy"):
        api = container_ports(with_service, component)
        assert by_target[component] == {(api["http"], "TCP"), (api["grpc"], "TCP")}, component
    dns = [ports_ for ports_, peers in rules if (53, "UDP") in ports_]
    assert dns == [{(53, "UDP"), (53, "TCP")}]
    port_in_url = re.search(r":(\d+)/", environment(service_container(with_service))["CAPABILITY_STORE"])
    assert port_in_url, "both value sets name the port"
    store_port = int(port_in_url[1])
    assert [ports_ for ports_, _ in rules if (store_port, "TCP") in ports_] == [{(store_port, "TCP")}]
    assert len(rules) == 4, "DNS, Triton, the proxy and the store: nothing else"


def test_service_store_port_defaults_to_postgresqls_and_egress_narrows_to_the_given_peers() -> None:
    database = [{"ipBlock": {"cidr": "10.20.0.0/24"}}]
    objects = render(merged(SERVICE_VALUES, {"service": {
        "store": {"url": "postgresql://capability@db/capabilities"}, "networkPolicy": {"store": {"to": database}}}}))
    rules = egress_rules(only(objects, "NetworkPolicy", "capability-service"))
    assert ({(5432, "TCP")}, database) in rules


def test_ingress_renders_only_when_enabled_and_always_with_tls() -> None:
    without = render(SERVICE_VALUES)
    assert list(of_kind(without, "Ingress")) == []
    ingress_values = {"enabled": True, "host": "capabilities.example.com", "className": "nginx",
                      "tls": {"secretName": "capabilities-tls"}}
    objects = render(merged(SERVICE_VALUES, {"service": {"ingress": ingress_values}}))
    ingress = only(objects, "Ingress", "capability-service")
    assert ingress["spec"]["tls"] == [{"hosts": ["capabilities.example.com"], "secretName": "capabilities-tls"}]
    assert ingress["spec"]["ingressClassName"] == "nginx"
    [rule] = ingress["spec"]["rules"]
    assert rule["host"] == "capabilities.example.com"
    [path] = rule["http"]["paths"]
    service = only(objects, "Service", "capability-service")
    assert path["backend"]["service"]["name"] == service["metadata"]["name"]
    assert path["backend"]["service"]["port"]["name"] in {port["name"] for port in service["spec"]["ports"]}
    # The ingress controller is let in by the service's NetworkPolicy, and only while the Ingress exists.
    callers = ingress_rules(only(objects, "NetworkPolicy", "capability-service"))[("http",)]
    callers_without = ingress_rules(only(without, "NetworkPolicy", "capability-service"))[("http",)]
    controller = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}},
                  "podSelector": {"matchLabels": {"app.kubernetes.io/name": "ingress-nginx"}}}
    assert controller in callers
    assert controller not in callers_without
    message = render_error(merged(SERVICE_VALUES, {"service": {"ingress": {**ingress_values,
                                                                            "tls": {"secretName": ""}}}}))
    assert "service.ingress.tls.secretName" in message


def test_service_image_is_a_light_pinned_python_without_the_model_side() -> None:
    [base] = dockerfile_instructions(SERVICE_DOCKERFILE, "FROM")
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", base), "python:3.11-slim, pinned to a patch release"
    [install] = [command for command in dockerfile_instructions(SERVICE_DOCKERFILE, "RUN") if "pip install" in command]
    assert '".[service]"' in install
    assert "[server]" not in install, "the model side (torch) stays out"
    entrypoint = json.loads(dockerfile_instructions(SERVICE_DOCKERFILE, "ENTRYPOINT")[0])
    command = json.loads(dockerfile_instructions(SERVICE_DOCKERFILE, "CMD")[0])
    objects = render(SERVICE_VALUES)
    container = service_container(objects)
    assert container["command"] == entrypoint, "kubectl exec … python -m capability runs what the image runs"
    assert command[0] == container["args"][0] == "serve"
    assert dockerfile_user(SERVICE_DOCKERFILE) == service_pod(objects)["securityContext"]["runAsUser"]
    assert dockerfile_instructions(SERVICE_DOCKERFILE, "EXPOSE") == [option_values(container["args"], "--port")[0]]
