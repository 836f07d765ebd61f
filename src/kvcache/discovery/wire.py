"""The API server's JSON for pods, decoded straight into discovery's plain types.

Watch responses are one JSON object per line, ``{"type": ..., "object": {...}}``; list responses
are a PodList. Decoding the raw bytes with msgspec (instead of the client's generated models)
reads only the few fields discovery needs, is fast on large fleets, and makes recorded streams
directly replayable in tests.
"""

from __future__ import annotations

import msgspec

from kvcache.discovery.reconciler import EventType, PodEvent, PodState
from kvcache.errors import KVCacheError


class WatchDecodeError(KVCacheError, ValueError):
    """A line or list from the API server is not what a pod watch or list returns."""


class Bookmark(msgspec.Struct, frozen=True):
    """A BOOKMARK event: nothing changed up to this resourceVersion."""

    resource_version: str


class WatchError(msgspec.Struct, frozen=True):
    """An ERROR event: the watch ended with this Status (410 = resume by relisting)."""

    code: int
    reason: str
    message: str


class PodPage(msgspec.Struct, frozen=True):
    """One page of a pod list."""

    pods: list[PodState]
    resource_version: str
    continue_token: str
    skipped: int = 0
    """Items that were not understandable pods (never seen from a real API server)."""


WatchItem = PodEvent | Bookmark | WatchError

_EVENT_TYPES: dict[str, EventType] = {
    "ADDED": "ADDED",
    "MODIFIED": "MODIFIED",
    "DELETED": "DELETED",
}


class _Condition(msgspec.Struct):
    type: str = ""
    status: str = ""


class _Metadata(msgspec.Struct, rename="camel"):
    name: str = ""
    namespace: str = ""
    uid: str = ""
    resource_version: str = ""
    deletion_timestamp: str | None = None


class _PodStatus(msgspec.Struct):
    phase: str = ""
    pod_ip: str | None = msgspec.field(default=None, name="podIP")
    conditions: list[_Condition] | None = None


class _Pod(msgspec.Struct):
    kind: str = "Pod"
    metadata: _Metadata = msgspec.field(default_factory=_Metadata)
    status: _PodStatus = msgspec.field(default_factory=_PodStatus)


class _Status(msgspec.Struct):
    """metav1.Status, the object of ERROR events and of failed requests."""

    kind: str = ""
    code: int = 0
    reason: str = ""
    message: str = ""


class _Line(msgspec.Struct):
    type: str
    object: msgspec.Raw


class _ListMeta(msgspec.Struct, rename="camel"):
    resource_version: str = ""
    continue_: str = msgspec.field(default="", name="continue")


class _PodList(msgspec.Struct):
    metadata: _ListMeta = msgspec.field(default_factory=_ListMeta)
    items: list[_Pod] | None = None


_line_decoder = msgspec.json.Decoder(_Line)
_pod_decoder = msgspec.json.Decoder(_Pod)
_status_decoder = msgspec.json.Decoder(_Status)
_list_decoder = msgspec.json.Decoder(_PodList)


def _pod_state(pod: _Pod) -> PodState:
    meta, status = pod.metadata, pod.status
    if pod.kind != "Pod" or not meta.name or not meta.namespace:
        raise WatchDecodeError(f"not a pod: kind {pod.kind!r}, name {meta.name!r}")
    ready = any(c.type == "Ready" and c.status == "True" for c in status.conditions or ())
    return PodState(
        namespace=meta.namespace,
        name=meta.name,
        uid=meta.uid,
        resource_version=meta.resource_version,
        phase=status.phase,
        ip=status.pod_ip or None,
        ready=ready,
        terminating=meta.deletion_timestamp is not None,
    )


def decode_watch_line(line: bytes) -> WatchItem:
    """Decode one line of a pod watch response; WatchDecodeError says what is wrong."""
    try:
        raw = _line_decoder.decode(line)
        if raw.type == "BOOKMARK":
            return Bookmark(_pod_decoder.decode(raw.object).metadata.resource_version)
        if raw.type == "ERROR":
            status = _status_decoder.decode(raw.object)
            return WatchError(status.code, status.reason, status.message)
        event_type = _EVENT_TYPES.get(raw.type)
        if event_type is None:
            raise WatchDecodeError(f"unknown watch event type {raw.type!r}")
        return PodEvent(event_type, _pod_state(_pod_decoder.decode(raw.object)))
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise WatchDecodeError(f"not a pod watch event: {exc}") from None


def decode_status(body: bytes) -> WatchError | None:
    """The Status in a failed request's body, if it holds one."""
    try:
        status = _status_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return WatchError(status.code, status.reason, status.message) if status.code else None


def decode_pod_list(body: bytes) -> PodPage:
    """Decode a PodList page; items that are not pods are counted in ``skipped``."""
    try:
        page = _list_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise WatchDecodeError(f"not a pod list: {exc}") from None
    pods: list[PodState] = []
    skipped = 0
    for item in page.items or ():
        try:
            pods.append(_pod_state(item))
        except WatchDecodeError:
            skipped += 1
    return PodPage(pods, page.metadata.resource_version, page.metadata.continue_, skipped)
