"""Shared by the discovery tests: the recorded streams and a target that records its calls."""

from __future__ import annotations

import threading
from pathlib import Path

from kvcache.discovery import PodEvent, PodState
from kvcache.discovery.wire import decode_pod_list, decode_watch_line

DATA = Path(__file__).resolve().parents[2] / "data" / "k8s"

Call = tuple[str, ...]


def lines(name: str) -> list[bytes]:
    """The raw lines of a recorded watch stream."""
    return (DATA / name).read_bytes().splitlines()


def pod_events(name: str) -> list[PodEvent]:
    """The pod events of a recorded stream (bookmarks and errors left out)."""
    items = [decode_watch_line(line) for line in lines(name)]
    return [item for item in items if isinstance(item, PodEvent)]


def pod_list(name: str) -> tuple[list[PodState], str]:
    """The pods and resourceVersion of a recorded list."""
    page = decode_pod_list((DATA / name).read_bytes())
    return page.pods, page.resource_version


class RecordingTarget:
    """A DiscoveryTarget that records calls in order; `wait_for` blocks until enough arrived."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self._changed = threading.Condition()

    def _record(self, *call: str) -> None:
        with self._changed:
            self.calls.append(call)
            self._changed.notify_all()

    def connect(self, pod_id: str, endpoint: str) -> None:
        self._record("connect", pod_id, endpoint)

    def disconnect(self, pod_id: str, endpoint: str) -> None:
        self._record("disconnect", pod_id, endpoint)

    def forget(self, pod_id: str) -> None:
        self._record("forget", pod_id)

    def wait_for(self, count: int, timeout: float = 20.0) -> list[Call]:
        """The calls once at least ``count`` were made (fails the test if they never are)."""
        with self._changed:
            reached = self._changed.wait_for(lambda: len(self.calls) >= count, timeout)
            assert reached, f"only {len(self.calls)} of {count} calls: {self.calls}"
            return list(self.calls)


def release(ip: str, port: int = 8000, socket_port: int = 5557) -> list[Call]:
    """The calls that let go of a pod bound by IP under the default ip:port identity."""
    return [("disconnect", f"{ip}:{port}", f"tcp://{ip}:{socket_port}"), ("forget", f"{ip}:{port}")]


def dial(ip: str, port: int = 8000, socket_port: int = 5557) -> list[Call]:
    """The call that binds a pod by IP under the default ip:port identity."""
    return [("connect", f"{ip}:{port}", f"tcp://{ip}:{socket_port}")]


# What the recorded expiry scenario must produce, derived by hand from the files' README:
# initial list, q7wzd NotReady, 410, relist, then z4c2n terminating and deleted.
EXPIRY_SCENARIO_CALLS: list[Call] = [
    *dial("10.244.3.21"),  # initial list: m8rvt, q7wzd, vllm-qwen-0 Ready; z4c2n has no IP
    *dial("10.244.1.40"),
    *dial("10.244.2.9"),
    *release("10.244.1.40"),  # q7wzd NotReady
    *release("10.244.3.21"),  # relist: m8rvt gone (removals come first)
    *dial("10.244.1.40"),  # q7wzd Ready again
    *release("10.244.2.9"),  # vllm-qwen-0 recreated elsewhere
    *dial("10.244.5.30"),
    *dial("10.244.4.8"),  # z4c2n Ready
    *release("10.244.4.8"),  # z4c2n terminating (its DELETED then changes nothing)
]
