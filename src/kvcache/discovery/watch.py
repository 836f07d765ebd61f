"""The live pod source: list + watch engine pods through the official Kubernetes client.

One background thread runs the informer loop: list every matching pod (in pages) and hand the
snapshot to the reconciler, then watch from the list's resourceVersion with bookmarks, resuming
each watch where the previous one stopped. A 410 Gone (the version fell out of the server's
history) — as an HTTP status or as an ERROR event in the stream — means relist. Other errors are
retried with exponential backoff. A periodic relist (`resync_seconds`) repairs anything missed.

The client is only used for credentials and HTTP: responses are read raw
(``_preload_content=False``) and decoded by `kvcache.discovery.wire`, so the same code path
runs against a recorded stream served on loopback in tests. The `kubernetes` package is
imported lazily (extra ``k8s``).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

from kvcache.discovery.config import DiscoveryConfig
from kvcache.discovery.reconciler import PodEvent, PodState, Reconciler
from kvcache.discovery.wire import (
    Bookmark,
    WatchDecodeError,
    WatchError,
    decode_pod_list,
    decode_status,
    decode_watch_line,
)
from kvcache.errors import ConfigError

log = logging.getLogger("kvcache.discovery")

_MAX_LINE = 16 * 1024 * 1024  # a pod object is a few KiB; anything near this is not a pod


class _ExpiredError(Exception):
    """The resourceVersion we hold is too old: relist."""


class _WatchFailedError(Exception):
    """The server ended a watch with an error other than 410."""


def _kubernetes() -> Any:
    """The `kubernetes` package, imported on first use (typed as Any: its typing varies by
    release)."""
    try:
        return importlib.import_module("kubernetes")
    except ImportError:
        raise ConfigError(
            "discovery", "pod discovery needs the Kubernetes client: pip install 'kvcache[k8s]'"
        ) from None


def load_client_configuration(config: DiscoveryConfig) -> Any:
    """A `kubernetes.client.Configuration` from the service account or a kubeconfig."""
    kubernetes = _kubernetes()
    configuration = kubernetes.client.Configuration()
    if config.kubeconfig is None:
        try:
            kubernetes.config.load_incluster_config(client_configuration=configuration)
        except kubernetes.config.ConfigException:
            pass  # not in a pod: try the default kubeconfig
        else:
            return configuration
    try:
        kubernetes.config.load_kube_config(
            config_file=config.kubeconfig,
            context=config.context,
            client_configuration=configuration,
            persist_config=False,
        )
    except (kubernetes.config.ConfigException, OSError) as exc:
        where = config.kubeconfig or "the default kubeconfig"
        raise ConfigError(
            "discovery.kubeconfig",
            f"no Kubernetes credentials (not in a cluster; {where}: {exc})",
        ) from None
    return configuration


class KubernetesPodSource:
    """List + watch the engine pods on a background thread and feed them to a reconciler."""

    def __init__(
        self,
        config: DiscoveryConfig,
        reconciler: Reconciler,
        *,
        client_configuration: Any = None,
    ) -> None:
        """``client_configuration``: a ready `kubernetes.client.Configuration` (else loaded
        from the service account or kubeconfig at `start`)."""
        self._config = config
        self._reconciler = reconciler
        self._client_configuration = client_configuration
        self._api: Any = None
        self._api_client: Any = None
        self._api_exception: type[Exception] = Exception
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._thread: threading.Thread | None = None
        self._response_lock = threading.Lock()
        self._response: Any = None
        self.resource_version: str | None = None
        """The last version seen (list, event or bookmark); the next watch starts there."""
        self.lists = 0
        self.watches = 0
        self.watch_events = 0
        self.bookmarks = 0
        self.expired = 0
        self.errors = 0
        self.malformed = 0

    def start(self) -> None:
        """Load credentials and start the thread (the first list happens on it)."""
        kubernetes = _kubernetes()
        configuration = self._client_configuration or load_client_configuration(self._config)
        self._api_client = kubernetes.client.ApiClient(configuration)
        self._api = kubernetes.client.CoreV1Api(self._api_client)
        self._api_exception = kubernetes.client.ApiException
        self._thread = threading.Thread(target=self._run, name="kvcache-discovery", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop watching: the open request is cut so the thread ends promptly."""
        self._stop.set()
        self._interrupt()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._api_client is not None:
            with contextlib.suppress(Exception):
                self._api_client.close()

    @property
    def running(self) -> bool:
        """Whether the watch thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def wait_synced(self, timeout: float | None = None) -> bool:
        """Wait until the first full list has been reconciled."""
        return self._synced.wait(timeout)

    def statistics(self) -> dict[str, Any]:
        """Counters of the list/watch loop."""
        return {
            "lists": self.lists,
            "watches": self.watches,
            "watch_events": self.watch_events,
            "bookmarks": self.bookmarks,
            "expired": self.expired,
            "errors": self.errors,
            "malformed": self.malformed,
            "synced": self._synced.is_set(),
        }

    def _run(self) -> None:
        config = self._config
        delay = config.retry_seconds
        next_relist = 0.0
        while not self._stop.is_set():
            try:
                due = config.resync_seconds > 0 and time.monotonic() >= next_relist
                if self.resource_version is None or due:
                    self._relist()
                    next_relist = time.monotonic() + config.resync_seconds
                began = time.monotonic()
                received = self._watch(next_relist if config.resync_seconds > 0 else None)
                if received or time.monotonic() - began >= 1.0:
                    delay = config.retry_seconds
                else:
                    # An empty watch that ended at once (a proxy cutting streams): back off
                    # rather than hammer the API server.
                    self._stop.wait(delay)
                    delay = min(delay * 2, config.max_retry_seconds)
            except _ExpiredError as exc:
                self.expired += 1
                self.resource_version = None
                log.info("pod discovery: %s; relisting", exc)
            except Exception as exc:
                if self._stop.is_set():
                    break
                self.errors += 1
                log.warning("pod discovery: %s; retrying in %.1fs", _describe(exc), delay)
                self._stop.wait(delay)
                delay = min(delay * 2, config.max_retry_seconds)

    def _relist(self) -> None:
        pods: list[PodState] = []
        token: str | None = None
        version = ""
        while True:
            response = self._request(
                limit=self._config.page_size,
                _continue=token,
                _request_timeout=self._config.request_timeout_seconds,
            )
            try:
                page = decode_pod_list(response.data)
            finally:
                self._release(response)
            if page.skipped:
                self.malformed += page.skipped
                log.warning("pod discovery: %d list items were not pods", page.skipped)
            pods.extend(page.pods)
            version = page.resource_version
            if not page.continue_token:
                break
            token = page.continue_token
        if self._stop.is_set():
            return
        self._reconciler.relist(pods, version)
        self.lists += 1
        self.resource_version = version or None
        self._synced.set()
        log.info("pod discovery: %d pods listed at version %s", len(pods), version or "?")

    def _watch(self, relist_at: float | None) -> int:
        """One watch request, until the server ends it; returns the lines received."""
        config = self._config
        duration = config.watch_timeout_seconds
        if relist_at is not None:
            duration = max(1, min(duration, math.ceil(relist_at - time.monotonic())))
        response = self._request(
            watch=True,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=duration,
            # The read timeout catches a connection that went silent without closing.
            _request_timeout=(
                config.request_timeout_seconds,
                duration + config.request_timeout_seconds,
            ),
        )
        self.watches += 1
        received = 0
        try:
            for line in _lines(response):
                if self._stop.is_set():
                    break
                if line.strip():
                    received += 1
                    self._handle(line)
        finally:
            self._release(response)
        return received

    def _handle(self, line: bytes) -> None:
        try:
            item = decode_watch_line(line)
        except WatchDecodeError as exc:
            self.malformed += 1
            log.warning("pod discovery: skipping a watch line: %s", exc)
            return
        if isinstance(item, PodEvent):
            self.watch_events += 1
            self._reconciler.apply(item)
            if item.pod.resource_version:
                self.resource_version = item.pod.resource_version
        elif isinstance(item, Bookmark):
            self.bookmarks += 1
            if item.resource_version:
                self.resource_version = item.resource_version
        elif isinstance(item, WatchError):
            if item.code == 410:
                raise _ExpiredError(f"watch expired ({item.reason}: {item.message})")
            raise _WatchFailedError(
                f"watch ended by the server: {item.code} {item.reason}: {item.message}"
            )

    def _request(self, **params: Any) -> Any:
        """One list or watch call; the raw urllib3 response, registered for `stop`."""
        if self._stop.is_set():
            raise _StoppedError
        common = {"label_selector": self._config.label_selector or None, "_preload_content": False}
        try:
            if self._config.namespace:
                response = self._api.list_namespaced_pod(self._config.namespace, **common, **params)
            else:
                response = self._api.list_pod_for_all_namespaces(**common, **params)
        except self._api_exception as exc:
            status = getattr(exc, "status", None)
            if status == 410:
                body = getattr(exc, "body", None)
                if isinstance(body, str):
                    body = body.encode("utf-8")
                detail = decode_status(body) if isinstance(body, bytes) else None
                raise _ExpiredError(detail.message if detail else "410 Gone") from None
            raise
        with self._response_lock:
            self._response = response
        if self._stop.is_set():  # stop() ran before the response was registered
            self._interrupt()
        return response

    def _release(self, response: Any) -> None:
        with self._response_lock:
            if self._response is response:
                self._response = None
        with contextlib.suppress(Exception):
            response.release_conn()

    def _interrupt(self) -> None:
        with self._response_lock:
            response = self._response
        if response is None:
            return
        # shutdown() (urllib3 >= 2.3) wakes a read blocked in another thread; close() does not
        # always, but the read timeout then ends it.
        shutdown = getattr(response, "shutdown", None) or response.close
        with contextlib.suppress(Exception):
            shutdown()


class _StoppedError(Exception):
    """stop() was called: no new request."""


def _lines(response: Any) -> Iterator[bytes]:
    """Split a streamed watch response into lines, however the chunks fall."""
    buffer = bytearray()
    for chunk in response.stream(64 * 1024, decode_content=True):
        buffer += chunk
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            yield bytes(buffer[start:end])
            start = end + 1
        del buffer[:start]
        if len(buffer) > _MAX_LINE:
            raise WatchDecodeError(f"a watch line longer than {_MAX_LINE} bytes")
    if buffer.strip():
        yield bytes(buffer)


def _describe(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None)
    if status is not None:
        return f"API server answered {status} {reason or ''}".rstrip()
    return f"{type(exc).__name__}: {exc}"
