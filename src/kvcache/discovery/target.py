"""Where the reconciler's decisions go in the service: the ZMQ subscriber and the index."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class EndpointSet(Protocol):
    """A transport whose dialled endpoints can change at run time (`events.Subscriber`)."""

    def add_endpoint(self, endpoint: str) -> None:
        """Dial ``endpoint`` (idempotent)."""

    def remove_endpoint(self, endpoint: str) -> None:
        """Stop dialling ``endpoint`` (idempotent); nothing more arrives from it afterwards."""


class SubscriberTarget:
    """Dials pods on a subscriber and forgets them through ``forget`` (the ingest pipeline's).

    With ``dial=False`` (engines publish to our bound endpoint) only `forget` does anything.
    """

    def __init__(
        self, endpoints: EndpointSet, forget: Callable[[str], object], *, dial: bool = True
    ) -> None:
        self._endpoints = endpoints
        self._forget = forget
        self._dial = dial

    def connect(self, pod_id: str, endpoint: str) -> None:
        """Dial the pod's publisher."""
        if self._dial:
            self._endpoints.add_endpoint(endpoint)

    def disconnect(self, pod_id: str, endpoint: str) -> None:
        """Hang up on the pod's publisher."""
        if self._dial:
            self._endpoints.remove_endpoint(endpoint)

    def forget(self, pod_id: str) -> None:
        """Drop every index entry of the pod."""
        self._forget(pod_id)
