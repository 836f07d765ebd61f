"""The live pod source against a loopback API server that serves the recorded streams.

The real `kubernetes` client does the HTTP (its Configuration points at the test server); the
server answers lists with recorded PodList bodies and watches with recorded watch lines, chunked
as the API server does, and records every request it gets.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import kubernetes
import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from k8s_recordings import (
    DATA,
    EXPIRY_SCENARIO_CALLS,
    RecordingTarget,
    dial,
    lines,
    release,
)

from kvcache.discovery import DiscoveryConfig, KubernetesPodSource, PodEvent, Reconciler
from kvcache.discovery.wire import (
    Bookmark,
    WatchDecodeError,
    WatchError,
    decode_pod_list,
    decode_watch_line,
)
from kvcache.errors import ConfigError


class Reply(msgspec.Struct):
    """One scripted answer: a status and body, or watch lines sent in chunks of ``chunk``."""

    status: int = 200
    body: bytes = b""
    lines: list[bytes] | None = None
    chunk: int | None = None
    hold: bool = False
    """After the lines, keep the stream open until the client leaves or timeoutSeconds pass."""


class FakeApiServer:
    """Serves scripted list and watch replies for pods and records every request."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.lists: list[Reply] = []
        self.watches: list[Reply] = []
        self.requests: list[tuple[str, dict[str, str], dict[str, str]]] = []
        self.closing = threading.Event()
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._last_list = Reply(404, b"{}")
        handler = self._handler()
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.http.daemon_threads = True
        if tls is not None:  # HTTPS, as a real API server in a pod sees it
            self.http.socket = tls.wrap_socket(self.http.socket, server_side=True)
        scheme = "http" if tls is None else "https"
        self.url = f"{scheme}://127.0.0.1:{self.http.server_address[1]}"
        self._thread = threading.Thread(target=self.http.serve_forever, daemon=True)

    def __enter__(self) -> FakeApiServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.closing.set()
        self.http.shutdown()
        self.http.server_close()

    def wait_requests(self, count: int, timeout: float = 20.0) -> list[dict[str, str]]:
        """The query strings once ``count`` requests arrived (fails if they never do)."""
        with self._arrived:
            reached = self._arrived.wait_for(lambda: len(self.requests) >= count, timeout)
            assert reached, f"only {len(self.requests)} requests: {self.requests}"
            return [query for _, query, _ in self.requests]

    def next_reply(self, watch: bool) -> Reply:
        """The next scripted reply; then watches idle and lists repeat the last one."""
        with self._lock:
            script = self.watches if watch else self.lists
            if script:
                reply = script.pop(0)
                if not watch:
                    self._last_list = reply
                return reply
            if watch:
                return Reply(lines=[], hold=True)
            return self._last_list

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = {key: values[-1] for key, values in parse_qs(url.query).items()}
                # Older clients send booleans as "True"; the API server accepts both spellings.
                query = {k: v.lower() if v in ("True", "False") else v for k, v in query.items()}
                with server._arrived:
                    headers = {key.lower(): value for key, value in self.headers.items()}
                    server.requests.append((url.path, query, headers))
                    server._arrived.notify_all()
                watch = query.get("watch") == "true"
                reply = server.next_reply(watch)
                if reply.lines is None:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    self.wfile.write(reply.body)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                data = b"".join(line + b"\n" for line in reply.lines)
                step = reply.chunk or max(1, max((len(x) + 1 for x in reply.lines), default=1))
                try:
                    for start in range(0, len(data), step):
                        self._chunk(data[start : start + step])
                    if reply.hold:
                        server.closing.wait(float(query.get("timeoutSeconds", "30")))
                    self._chunk(b"")
                except OSError:
                    pass  # the client hung up (stop())
                self.close_connection = True

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

        return Handler


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        yield server


def _source(
    server: FakeApiServer, target: RecordingTarget, **settings: Any
) -> tuple[KubernetesPodSource, Reconciler]:
    settings.setdefault("retry_seconds", 0.01)
    config = DiscoveryConfig(enabled=True, **settings)
    configuration = kubernetes.client.Configuration()
    configuration.host = server.url
    reconciler = Reconciler(target, config)
    return KubernetesPodSource(config, reconciler, client_configuration=configuration), reconciler


def _file(name: str) -> bytes:
    return (DATA / name).read_bytes()


def test_list_watch_410_relist_watch(api: FakeApiServer) -> None:
    api.lists = [
        Reply(body=_file("initial_list.json")),
        Reply(body=_file("relist_after_expiry.json")),
    ]
    api.watches = [Reply(lines=lines("expired.jsonl")), Reply(lines=lines("after_relist.jsonl"))]
    target = RecordingTarget()
    source, _ = _source(api, target)
    source.start()
    try:
        assert source.wait_synced(20)
        # The fifth request is the watch resumed after the last recorded stream ended.
        api.wait_requests(5)
    finally:
        source.stop()
    assert not source.running
    assert target.calls == EXPIRY_SCENARIO_CALLS
    # list, watch from the list's version, 410, relist, watch from the relist's version.
    paths = [path for path, _, _ in api.requests]
    assert paths[:4] == ["/api/v1/pods"] * 4
    queries = [query for _, query, _ in api.requests]
    assert [q.get("watch") for q in queries[:4]] == [None, "true", None, "true"]
    assert queries[1]["resourceVersion"] == "60000"
    assert queries[3]["resourceVersion"] == "61500"
    assert queries[4]["resourceVersion"] == "61548"
    assert all(q["labelSelector"] == "llm-d.ai/inference-serving=true" for q in queries)
    assert queries[0]["limit"] == "500" and "resourceVersion" not in queries[0]
    assert queries[1]["allowWatchBookmarks"] == "true"
    stats = source.statistics()
    assert stats["lists"] == 2 and stats["expired"] == 1 and stats["errors"] == 0
    assert stats["watch_events"] == 3 and stats["bookmarks"] == 2 and stats["malformed"] == 0


def test_namespaced_watch_split_into_odd_chunks_with_a_bad_line(api: FakeApiServer) -> None:
    recorded = lines("lifecycle.jsonl")
    empty = (
        b'{"kind":"PodList","apiVersion":"v1","metadata":{"resourceVersion":"48100"},"items":[]}'
    )
    api.lists = [Reply(body=empty)]
    api.watches = [Reply(lines=[*recorded[:3], b"{not json", *recorded[3:]], chunk=777)]
    target = RecordingTarget()
    source, reconciler = _source(api, target, namespace="llm", label_selector="app=vllm-llama")
    source.start()
    try:
        # The stream ends; the next watch resumes from the last event's version.
        queries = api.wait_requests(3)
    finally:
        source.stop()
    assert queries[2]["resourceVersion"] == "48316"
    assert target.calls == [
        *dial("10.244.1.17"),
        *dial("10.244.3.21"),
        *release("10.244.1.17"),
        *dial("10.244.1.17"),
        *release("10.244.1.17"),
    ]
    path, query, _ = api.requests[1]
    assert path == "/api/v1/namespaces/llm/pods"
    assert query["labelSelector"] == "app=vllm-llama" and query["resourceVersion"] == "48100"
    stats = source.statistics()
    assert stats["malformed"] == 1 and stats["watch_events"] == len(recorded) - 1
    assert reconciler.statistics()["connected_pods"] == 1


def test_http_410_on_the_watch_request_relists(api: FakeApiServer) -> None:
    status = json.dumps(
        {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": "too old resource version: 60000 (60912)",
            "reason": "Expired",
            "code": 410,
        }
    ).encode()
    api.lists = [
        Reply(body=_file("initial_list.json")),
        Reply(body=_file("relist_after_expiry.json")),
    ]
    api.watches = [Reply(410, status)]
    target = RecordingTarget()
    source, _ = _source(api, target)
    source.start()
    try:
        queries = api.wait_requests(4)  # the relist is applied before the watch is made
    finally:
        source.stop()
    assert [q.get("watch") for q in queries[:4]] == [None, "true", None, "true"]
    assert queries[3]["resourceVersion"] == "61500"
    assert source.statistics()["expired"] == 1 and source.statistics()["errors"] == 0
    # The relist alone repairs what changed while the watch was gone.
    assert target.calls[:3] == [*dial("10.244.3.21"), *dial("10.244.1.40"), *dial("10.244.2.9")]
    assert target.calls[3:] == [
        *release("10.244.3.21"),
        *release("10.244.2.9"),
        *dial("10.244.5.30"),
        *dial("10.244.4.8"),
    ]


def test_server_errors_are_retried(api: FakeApiServer) -> None:
    failure = (
        b'{"kind":"Status","status":"Failure","message":"etcdserver: leader changed","code":500}'
    )
    api.lists = [Reply(500, failure), Reply(403, b"{}"), Reply(body=_file("initial_list.json"))]
    target = RecordingTarget()
    source, _ = _source(api, target)
    source.start()
    try:
        assert source.wait_synced(20)
        queries = api.wait_requests(4)
    finally:
        source.stop()
    assert [q.get("watch") for q in queries[:4]] == [None, None, None, "true"]
    assert source.statistics()["errors"] == 2
    assert len(target.calls) == 3


def test_periodic_resync_relists_while_the_watch_is_healthy(api: FakeApiServer) -> None:
    api.lists = [
        Reply(body=_file("initial_list.json")),
        Reply(body=_file("relist_after_expiry.json")),
    ]
    target = RecordingTarget()
    source, _ = _source(api, target, resync_seconds=0.01)
    source.start()
    try:
        queries = api.wait_requests(4)  # list, watch, relist (applied), watch
    finally:
        source.stop()
    # The watch asked to end at the resync point (at least 1 s), then came the relist.
    assert queries[1]["timeoutSeconds"] == "1"
    assert [q.get("watch") for q in queries[:4]] == [None, "true", None, "true"]
    assert source.statistics()["expired"] == 0 and source.statistics()["lists"] >= 2
    assert ("forget", "10.244.3.21:8000") in target.calls


def test_credentials_come_from_a_kubeconfig(api: FakeApiServer, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "test", "cluster": {"server": api.url}}],
                "users": [{"name": "kvcache", "user": {"token": "s3cr3t-token"}}],
                "contexts": [{"name": "ctx", "context": {"cluster": "test", "user": "kvcache"}}],
                "current-context": "ctx",
            }
        )
    )
    config = DiscoveryConfig(enabled=True, kubeconfig=str(kubeconfig), namespace="llm")
    headers, target = _sync_with_own_credentials(api, config)
    assert headers["authorization"] == "Bearer s3cr3t-token"
    assert len(target.calls) == 3


def _sync_with_own_credentials(
    api: FakeApiServer, config: DiscoveryConfig
) -> tuple[dict[str, str], RecordingTarget]:
    """List once with the credentials ``config`` leads to (no client configuration handed
    in); the first request's headers and what the reconciler did."""
    api.lists = [Reply(body=_file("initial_list.json"))]
    target = RecordingTarget()
    source = KubernetesPodSource(config, Reconciler(target, config))
    source.start()
    try:
        assert source.wait_synced(20)
    finally:
        source.stop()
    _, _, headers = api.requests[0]
    return headers, target


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by itself (it is its own CA) and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "ca.crt", directory / "server.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def test_credentials_come_from_the_service_account_in_a_pod(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No kubeconfig configured and running in a pod: the API server from the service
    environment, over HTTPS checked against the mounted CA, with the mounted token."""
    cert_file, key_file = _self_signed(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert_file, key_file)
    token_file = tmp_path / "token"
    token_file.write_text("service-account-token")
    # Where the Kubernetes client reads a pod's mounted service account, here in tmp_path.
    incluster = kubernetes.config.incluster_config
    monkeypatch.setattr(incluster, "SERVICE_TOKEN_FILENAME", str(token_file))
    monkeypatch.setattr(incluster, "SERVICE_CERT_FILENAME", str(cert_file))
    with FakeApiServer(tls) as api:
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(api.http.server_address[1]))
        config = DiscoveryConfig(enabled=True, namespace="llm")
        assert config.kubeconfig is None
        headers, target = _sync_with_own_credentials(api, config)
    scheme, token = headers["authorization"].split(" ", 1)  # the client writes "bearer"
    assert (scheme.lower(), token) == ("bearer", "service-account-token")
    assert len(target.calls) == 3


def test_a_missing_kubeconfig_is_a_config_error(tmp_path: Path) -> None:
    config = DiscoveryConfig(enabled=True, kubeconfig=str(tmp_path / "absent"))
    source = KubernetesPodSource(config, Reconciler(RecordingTarget(), config))
    with pytest.raises(ConfigError, match=r"discovery\.kubeconfig"):
        source.start()
    assert not source.running


def _expected_pod(line: bytes) -> dict[str, Any] | None:
    """The fields discovery needs, read from the raw JSON with plain dict lookups."""
    event = json.loads(line)
    if event["type"] not in ("ADDED", "MODIFIED", "DELETED"):
        return None
    meta, status = event["object"]["metadata"], event["object"]["status"]
    return {
        "type": event["type"],
        "namespace": meta["namespace"],
        "name": meta["name"],
        "uid": meta["uid"],
        "resource_version": meta["resourceVersion"],
        "phase": status["phase"],
        "ip": status.get("podIP"),
        "ready": any(
            c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", [])
        ),
        "terminating": "deletionTimestamp" in meta,
    }


@pytest.mark.parametrize(
    "name", ["lifecycle.jsonl", "reschedule.jsonl", "expired.jsonl", "after_relist.jsonl"]
)
def test_recorded_lines_decode_to_what_they_say(name: str) -> None:
    for line in lines(name):
        item = decode_watch_line(line)
        expected = _expected_pod(line)
        raw = json.loads(line)
        if expected is not None:
            assert isinstance(item, PodEvent)
            pod = item.pod
            assert {
                "type": item.type,
                "namespace": pod.namespace,
                "name": pod.name,
                "uid": pod.uid,
                "resource_version": pod.resource_version,
                "phase": pod.phase,
                "ip": pod.ip,
                "ready": pod.ready,
                "terminating": pod.terminating,
            } == expected
        elif raw["type"] == "BOOKMARK":
            assert item == Bookmark(raw["object"]["metadata"]["resourceVersion"])
        else:
            assert item == WatchError(410, "Expired", raw["object"]["message"])


def test_pod_lists_decode_with_their_version() -> None:
    page = decode_pod_list(_file("initial_list.json"))
    raw = json.loads(_file("initial_list.json"))
    assert page.resource_version == raw["metadata"]["resourceVersion"] == "60000"
    assert [pod.name for pod in page.pods] == [item["metadata"]["name"] for item in raw["items"]]
    assert [pod.ip for pod in page.pods] == [item["status"].get("podIP") for item in raw["items"]]
    assert page.continue_token == "" and page.skipped == 0


def test_list_items_that_are_not_pods_are_skipped_and_counted() -> None:
    body = b'{"metadata":{"resourceVersion":"7","continue":"abc"},"items":[{"metadata":{}},' + (
        b'{"metadata":{"name":"p","namespace":"n"},"status":{"phase":"Running"}}]}'
    )
    page = decode_pod_list(body)
    assert [pod.name for pod in page.pods] == ["p"]
    assert page.skipped == 1 and page.continue_token == "abc"


@pytest.mark.parametrize(
    "line",
    [
        b"{not json",
        b'{"type":"ADDED"}',
        b'{"type":"RENAMED","object":{"kind":"Pod","metadata":{"name":"p","namespace":"n"}}}',
        b'{"type":"ADDED","object":{"kind":"Pod","metadata":{"namespace":"n"}}}',
        b'{"type":"MODIFIED","object":{"kind":"Status","code":500}}',
        b'{"type":"ADDED","object":{"kind":"Pod","metadata":{"name":7,"namespace":"n"}}}',
        b'["ADDED"]',
    ],
)
def test_malformed_lines_raise_a_decode_error(line: bytes) -> None:
    with pytest.raises(WatchDecodeError):
        decode_watch_line(line)
