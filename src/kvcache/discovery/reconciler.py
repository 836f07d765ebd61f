"""Pod reconciler: pod watch events and relists in, connect / disconnect / forget calls out.

Pure bookkeeping, no I/O: the watch source feeds it plain `PodState`s, and it drives an injected
`DiscoveryTarget` (the ZMQ subscriber and the ingest pipeline in the service). A pod is *bound*
(its publisher dialled under its identity) while it is Running, Ready, has an IP and is not
terminating. When it stops being so, is deleted, vanishes from a relist, moves to another IP or
is recreated under the same name, it is disconnected and its identity forgotten: its index
entries go too, because whatever the engine held is gone or, after a disconnection, no longer
followed event by event (the Go original keeps them).

Every call is idempotent: duplicated, stale and out-of-order events are recognised (by
resourceVersion, which every API server today issues as an etcd revision; non-numeric versions
are applied in arrival order) and ignored.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol

import msgspec

from kvcache.discovery.config import DiscoveryConfig

log = logging.getLogger("kvcache.discovery")

EventType = Literal["ADDED", "MODIFIED", "DELETED"]

_MAX_TOMBSTONES = 10_000


class PodState(msgspec.Struct, frozen=True, kw_only=True):
    """What discovery needs to know about one pod, taken from its API object."""

    namespace: str
    name: str
    uid: str = ""
    """Differs between two pods that had the same name (a StatefulSet pod recreated)."""
    resource_version: str = ""
    phase: str = ""
    """Pending, Running, Succeeded, Failed or Unknown."""
    ip: str | None = None
    """status.podIP; None until the network is set up."""
    ready: bool = False
    """The pod's Ready condition is True."""
    terminating: bool = False
    """metadata.deletionTimestamp is set: the pod is shutting down, even if still Ready."""

    @property
    def key(self) -> str:
        """``namespace/name``: how the reconciler tracks the pod across its incarnations."""
        return f"{self.namespace}/{self.name}"


class PodEvent(msgspec.Struct, frozen=True):
    """One watch event about a pod."""

    type: EventType
    pod: PodState


class Binding(NamedTuple):
    """A bound pod: the identity its events are indexed under, and its publisher's endpoint."""

    pod_id: str
    endpoint: str


class DiscoveryTarget(Protocol):
    """What the reconciler drives. Calls come from one thread, in order."""

    def connect(self, pod_id: str, endpoint: str) -> None:
        """Start receiving the pod's events from ``endpoint``."""

    def disconnect(self, pod_id: str, endpoint: str) -> None:
        """Stop receiving from ``endpoint`` (called before `forget`)."""

    def forget(self, pod_id: str) -> None:
        """Remove every index entry of ``pod_id``."""


def pod_binding(pod: PodState, config: DiscoveryConfig) -> Binding | None:
    """The binding a pod should have now, or None when it must not be dialled."""
    if pod.phase != "Running" or not pod.ready or pod.terminating or not pod.ip:
        return None
    host = f"[{pod.ip}]" if ":" in pod.ip else pod.ip  # IPv6 needs brackets in a ZMQ endpoint
    endpoint = f"tcp://{host}:{config.socket_port}"
    identity = config.pod_identity
    if identity == "ip_port":
        # As the engine writes it in its topic ("$(POD_IP):8000"): no brackets, even for IPv6.
        return Binding(f"{pod.ip}:{config.identity_port}", endpoint)
    if identity == "ip":
        return Binding(pod.ip, endpoint)
    if identity == "name":
        return Binding(pod.name, endpoint)
    return Binding(pod.key, endpoint)


def _revision(resource_version: str) -> int | None:
    return int(resource_version) if resource_version.isdigit() else None


@dataclass
class _Tracked:
    uid: str
    revision: int | None
    binding: Binding | None = None


@dataclass
class _Stats:
    events: int = 0
    relists: int = 0
    connects: int = 0
    disconnects: int = 0
    forgets: int = 0
    stale_events: int = 0
    duplicate_events: int = 0
    identity_conflicts: int = 0
    target_errors: int = 0


class Reconciler:
    """Keeps the target's connections and index entries in step with the pods' readiness."""

    def __init__(self, target: DiscoveryTarget, config: DiscoveryConfig | None = None) -> None:
        self._target = target
        self._config = config or DiscoveryConfig()
        self._lock = threading.Lock()
        self._pods: dict[str, _Tracked] = {}
        # Deleted pods (key -> uid): a late event about a deleted incarnation must not revive it.
        self._tombstones: dict[str, str] = {}
        # The last relist's resourceVersion: no event at or below it can be news.
        self._floor: int | None = None
        # Pods (keys) per endpoint and per identity, so that a pod that lingers in our view while
        # its IP is reused only releases what no other pod holds.
        self._endpoint_owners: dict[str, set[str]] = {}
        self._identity_owners: dict[str, set[str]] = {}
        self._stats = _Stats()

    def apply(self, event: PodEvent) -> None:
        """Apply one ADDED / MODIFIED / DELETED event."""
        pod = event.pod
        key = pod.key
        revision = _revision(pod.resource_version)
        with self._lock:
            self._stats.events += 1
            order = self._order(key, pod.uid, revision, event.type)
            if order == "stale":
                self._stats.stale_events += 1
                log.debug("ignoring a stale %s of pod %s (rv %s)", event.type, key, revision)
                return
            if order == "duplicate":
                self._stats.duplicate_events += 1
                return
            if event.type == "DELETED":
                tracked = self._pods.get(key)
                if tracked is not None and (not pod.uid or tracked.uid == pod.uid):
                    self._remove(key, "deleted")
                self._tombstones.pop(key, None)  # re-inserted last: the dict stays age-ordered
                self._tombstones[key] = pod.uid
                if len(self._tombstones) > _MAX_TOMBSTONES:
                    del self._tombstones[next(iter(self._tombstones))]
                return
            self._upsert(key, pod, revision)

    def relist(self, pods: Iterable[PodState], resource_version: str = "") -> None:
        """Make the state match a full list: pods absent from it are removed."""
        current = {pod.key: pod for pod in pods}
        with self._lock:
            self._stats.relists += 1
            # Removals first: a pod that took over a vanished pod's IP then dials afresh and the
            # vanished pod's entries are forgotten rather than shared.
            for key in [key for key in self._pods if key not in current]:
                self._remove(key, "no longer listed")
            for key, pod in current.items():
                self._upsert(key, pod, _revision(pod.resource_version))
            self._tombstones.clear()
            floor = _revision(resource_version)
            if floor is not None:
                self._floor = floor

    def bindings(self) -> dict[str, Binding]:
        """Bound pods: ``namespace/name`` -> (identity, endpoint)."""
        with self._lock:
            return {
                key: tracked.binding
                for key, tracked in self._pods.items()
                if tracked.binding is not None
            }

    def statistics(self) -> dict[str, Any]:
        """Counters, plus the pods and endpoints currently bound."""
        with self._lock:
            stats: dict[str, Any] = dict(vars(self._stats))
            stats["tracked_pods"] = len(self._pods)
            stats["connected_pods"] = sum(1 for t in self._pods.values() if t.binding is not None)
            stats["endpoints"] = len(self._endpoint_owners)
            return stats

    def _order(
        self, key: str, uid: str, revision: int | None, event_type: EventType
    ) -> Literal["new", "stale", "duplicate"]:
        if uid and self._tombstones.get(key) == uid:
            return "stale"  # this incarnation was deleted: nothing after that is news
        if revision is None:
            return "new"
        if self._floor is not None and revision <= self._floor:
            return "stale"
        tracked = self._pods.get(key)
        if tracked is None or tracked.revision is None:
            return "new"
        if revision < tracked.revision:
            return "stale"
        # A DELETED carrying the last seen version is still news (older servers sent it so).
        if revision == tracked.revision and event_type != "DELETED":
            return "duplicate" if uid == tracked.uid else "stale"
        return "new"

    def _upsert(self, key: str, pod: PodState, revision: int | None) -> None:
        desired = pod_binding(pod, self._config)
        tracked = self._pods.get(key)
        if tracked is None:
            tracked = self._pods[key] = _Tracked(pod.uid, revision)
        recreated = tracked.uid != pod.uid
        if tracked.binding is not None and (recreated or tracked.binding != desired):
            if recreated:
                reason = "recreated"
            elif desired is None:
                reason = "not ready" if not pod.terminating else "terminating"
            else:
                reason = f"moved to {desired.endpoint}"
            self._unbind(key, tracked, reason)
        tracked.uid = pod.uid
        tracked.revision = revision
        if recreated:
            self._tombstones.pop(key, None)
        if desired is not None and tracked.binding is None:
            self._bind(key, tracked, desired)

    def _remove(self, key: str, reason: str) -> None:
        tracked = self._pods.pop(key)
        if tracked.binding is not None:
            self._unbind(key, tracked, reason)

    def _bind(self, key: str, tracked: _Tracked, binding: Binding) -> None:
        tracked.binding = binding
        holders = self._identity_owners.setdefault(binding.pod_id, set())
        if holders:
            self._stats.identity_conflicts += 1
            log.warning(
                "pods %s and %s both have the identity %r: their entries cannot be told apart",
                key,
                ", ".join(sorted(holders)),
                binding.pod_id,
            )
        holders.add(key)
        owners = self._endpoint_owners.setdefault(binding.endpoint, set())
        owners.add(key)
        if len(owners) == 1:
            log.info("pod %s ready: dialling %s as %r", key, binding.endpoint, binding.pod_id)
            self._stats.connects += 1
            self._call(self._target.connect, binding.pod_id, binding.endpoint)

    def _unbind(self, key: str, tracked: _Tracked, reason: str) -> None:
        binding, tracked.binding = tracked.binding, None
        assert binding is not None
        log.info("pod %s %s: releasing %s (%r)", key, reason, binding.endpoint, binding.pod_id)
        owners = self._endpoint_owners[binding.endpoint]
        owners.discard(key)
        if not owners:
            del self._endpoint_owners[binding.endpoint]
            self._stats.disconnects += 1
            self._call(self._target.disconnect, binding.pod_id, binding.endpoint)
        holders = self._identity_owners[binding.pod_id]
        holders.discard(key)
        if not holders:
            del self._identity_owners[binding.pod_id]
            self._stats.forgets += 1
            self._call(self._target.forget, binding.pod_id)

    def _call(self, method: Callable[..., object], *args: str) -> None:
        try:
            method(*args)
        except Exception:  # one failing pod must not stop discovery of the others
            self._stats.target_errors += 1
            log.exception("pod discovery: %s%s failed", getattr(method, "__name__", method), args)
