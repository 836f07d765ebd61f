"""Ingest pipeline: shard raw messages by pod onto bounded queues, decode and apply in order.

Each pod always lands on the same shard (a stable hash of its id), so its events are applied in
arrival order by one worker. A full queue drops the message and counts it; the sequence number
of the pod's next message then shows the loss as a gap, exactly like a network loss.

With one shard (the default) there is no queue and no worker: `submit` decodes and applies on
the caller's thread (the one that reads the ZMQ socket). On CPython a hand-off to another thread
only adds GIL traffic, and the socket's own receive buffer (bounded by its high-water mark; a
drop shows as a sequence gap) already holds what arrives while a message is applied.
"""

from __future__ import annotations

import logging
import queue
import threading
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from kvcache.events.apply import EventApplier, HashMode
from kvcache.events.decode import decode_frames, parse_topic
from kvcache.hashing import KeyScheme
from kvcache.index.protocol import Index
from kvcache.priority import ReadPriority

log = logging.getLogger("kvcache.events")

_STOP = object()


class _Call:
    """A function a shard's worker runs in order with the messages queued before it."""

    def __init__(self, run: Callable[[], None]) -> None:
        self.run = run


def shard_of(pod: str, shards: int) -> int:
    """The shard that applies a pod's events (stable across processes and restarts)."""
    return zlib.crc32(pod.encode("utf-8")) % shards


class IngestPipeline:
    """Bounded per-shard queues, one worker thread per shard, one `EventApplier` per shard."""

    def __init__(
        self,
        index: Index,
        scheme: KeyScheme,
        *,
        shards: int = 1,
        queue_size: int = 10_000,
        dp_rank_in_pod_id: bool = False,
        priority: ReadPriority | None = None,
    ) -> None:
        self.shards = max(1, shards)
        self.priority = priority
        self.appliers = [
            EventApplier(index, scheme, dp_rank_in_pod_id=dp_rank_in_pod_id)
            for _ in range(self.shards)
        ]
        self._queues: list[queue.Queue[Any]] = [
            queue.Queue(maxsize=queue_size) for _ in range(self.shards)
        ]
        self._workers: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._inline = self.shards == 1
        self._apply_lock = threading.Lock()  # inline mode: callers on several threads queue here
        self.overflow: Counter[str] = Counter()

    def start(self) -> None:
        """Start the worker threads (none with one shard: messages are applied inline)."""
        if self._inline:
            return
        for number, (applier, inbox) in enumerate(zip(self.appliers, self._queues, strict=True)):
            worker = threading.Thread(
                target=self._work,
                args=(applier, inbox, self.priority),
                name=f"kvcache-ingest-{number}",
            )
            worker.daemon = True
            worker.start()
            self._workers.append(worker)

    def submit(self, frames: Sequence[bytes]) -> bool:
        """Queue one raw message; False (and counted) when its shard's queue is full.

        With one shard the message is decoded and applied before this returns.
        """
        if self._inline:
            if self.priority is not None:
                self.priority.yield_to_readers()
            applier = self.appliers[0]
            with self._apply_lock:
                try:
                    applier.apply(
                        decode_frames(frames, skip_tokens=applier.skip_tokens_for, runs=True)
                    )
                except Exception:  # a bug must not stop ingest for every other pod
                    log.exception("failed to apply a message")
            return True
        topic = frames[0] if frames else b""
        try:
            pod = parse_topic(bytes(topic).decode("utf-8"))[0]
        except UnicodeDecodeError:
            pod = ""  # the decoder rejects it with a reason; any shard will do
        inbox = self._queues[shard_of(pod, self.shards)]
        try:
            inbox.put_nowait(frames)
        except queue.Full:
            with self._lock:
                self.overflow[pod] += 1
            return False
        return True

    def forget_pod(self, pod: str, timeout: float = 30.0) -> int:
        """Drop a pod that left the fleet: its ingest state and every index entry; returns the
        entries removed. Runs in order with the pod's queued messages (after them)."""
        # A "<publisher>@dp<rank>" pod lives on its publisher's shard, not on its own hash's.
        shard = next(
            (
                n
                for n, a in enumerate(self.appliers)
                if pod in a.pods or any(key[0] == pod for key in list(a.sequences.streams))
            ),
            shard_of(pod, self.shards),
        )
        applier = self.appliers[shard]

        def forget_all() -> int:
            # with dp_rank_in_pod_id its ranks are pods "<pod>@dp<rank>" of their own
            ranks = [p for p in applier.pods if p.startswith(pod + "@dp")]
            return sum(applier.forget_pod(name) for name in [pod, *ranks])

        if self._inline or not self._workers:
            with self._apply_lock:
                return forget_all()
        done = threading.Event()
        removed: list[int] = []

        def forget() -> None:
            try:
                removed.append(forget_all())
            finally:
                done.set()

        self._queues[shard].put(_Call(forget))
        if not done.wait(timeout):
            raise TimeoutError(f"forgetting pod {pod!r} took longer than {timeout} s")
        return removed[0]

    def stop(self, timeout: float = 30.0) -> None:
        """Apply everything already queued, then stop the workers."""
        for inbox in self._queues:
            inbox.put(_STOP)
        for worker in self._workers:
            worker.join(timeout)
        self._workers.clear()

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until every queued message has been applied (tests, benchmarks)."""
        done = threading.Event()

        def waiter() -> None:
            for inbox in self._queues:
                inbox.join()
            done.set()

        threading.Thread(target=waiter, daemon=True).start()
        return done.wait(timeout)

    @staticmethod
    def _work(
        applier: EventApplier, inbox: queue.Queue[Any], priority: ReadPriority | None
    ) -> None:
        while True:
            frames = inbox.get()
            try:
                if frames is _STOP:
                    return
                if type(frames) is _Call:
                    frames.run()
                    continue
                if priority is not None:
                    priority.yield_to_readers()
                applier.apply(decode_frames(frames, skip_tokens=applier.skip_tokens_for, runs=True))
            except Exception:  # a bug must not stop ingest for every other pod
                log.exception("failed to apply a message")
            finally:
                inbox.task_done()

    @property
    def inline(self) -> bool:
        """Whether `submit` applies on the caller's thread (one shard) instead of queueing."""
        return self._inline

    def queue_depths(self) -> list[int]:
        """Messages waiting per shard."""
        return [inbox.qsize() for inbox in self._queues]

    def pod_states(self) -> dict[str, dict[str, Any]]:
        """Per-pod ingest state: hash mode, sequence, gaps, resets, last event time.

        A snapshot: with queued shards it may be a message behind the workers.
        """
        if self._inline:
            if self.priority is not None:
                self.priority.yield_to_readers()
            with self._apply_lock:
                return self._pod_states()
        for _ in range(8):  # a worker may add a pod while we iterate its dicts
            try:
                return self._pod_states()
            except RuntimeError:
                continue
        return self._pod_states()

    def _pod_states(self) -> dict[str, dict[str, Any]]:
        result: dict[str, dict[str, Any]] = {}
        for applier in self.appliers:
            for (publisher, rank), stream in applier.sequences.streams.items():
                entry = result.setdefault(publisher, {"streams": {}})
                entry["streams"][str(rank)] = {
                    "last_seq": stream.last_seq,
                    "batches": stream.batches,
                    "gaps": stream.gaps,
                    "lost_batches": stream.lost_batches,
                    "resets": stream.resets,
                    "duplicates": stream.duplicates,
                    "last_event_time": stream.last_event_time,
                }
            for pod, state in applier.pods.items():
                entry = result.setdefault(pod, {"streams": {}})
                entry["hash_mode"] = state.mode.value
                entry["matched_scheme"] = state.matched_scheme
                entry["verified_events"] = state.verified_events
        return result

    def statistics(self) -> dict[str, Any]:
        """Counters summed over shards."""
        totals: dict[str, Any] = {
            "messages": 0,
            "blocks_stored": 0,
            "blocks_removed": 0,
            "clears": 0,
            "gaps": 0,
            "resets": 0,
            "duplicates": 0,
            "hash_mismatches": 0,
            "events_applied": Counter(),
            "events_rejected": Counter(),
            "frames_rejected": Counter(),
            "blocks_skipped": Counter(),
        }
        modes: Counter[str] = Counter()
        for applier in self.appliers:
            stats = applier.stats
            for name in (
                "messages",
                "blocks_stored",
                "blocks_removed",
                "clears",
                "gaps",
                "resets",
                "duplicates",
                "hash_mismatches",
            ):
                totals[name] += getattr(stats, name)
            for name in ("events_applied", "events_rejected", "frames_rejected", "blocks_skipped"):
                totals[name].update(getattr(stats, name))
            modes.update(state.mode.value for state in applier.pods.values())
        with self._lock:
            totals["queue_overflow"] = sum(self.overflow.values())
        totals["queue_depth"] = sum(self.queue_depths())
        totals["pods_by_hash_mode"] = {mode.value: modes[mode.value] for mode in HashMode}
        return {
            key: dict(value) if isinstance(value, Counter) else value
            for key, value in totals.items()
        }
