"""A bounded thread pool that keeps tokenization off the event loop.

The Rust tokenizer releases the GIL while it encodes, so a few threads tokenize in parallel;
template rendering (Python) does not, but it is short. Waiting requests are bounded (refused,
not queued forever) and every call has a deadline. A call that times out keeps its thread until
it finishes (Python cannot interrupt a thread); the caller gets the error at the deadline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from kvcache.histogram import LatencyHistogram
from kvcache.tokenization.errors import PoolOverloadedError, TokenizationTimeoutError

P = ParamSpec("P")
T = TypeVar("T")


class TokenizationPool:
    """``workers`` threads, at most ``queue_size`` calls admitted, ``timeout`` seconds each."""

    def __init__(self, workers: int = 4, *, queue_size: int = 1024, timeout: float = 5.0) -> None:
        if workers < 1 or queue_size < 1 or timeout <= 0:
            raise ValueError("workers and queue_size must be >= 1, timeout > 0")
        self.workers = workers
        self.queue_size = queue_size
        self.timeout = timeout
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="kvcache-tokenize"
        )
        self._slots = threading.BoundedSemaphore(queue_size)
        self._stats_lock = threading.Lock()
        self.completed = 0
        self.failed = 0
        self.timeouts = 0
        self.rejected = 0
        self._in_flight = 0
        # admission to completion: what a caller waits, queueing included
        self._latency = LatencyHistogram()

    def _submit(
        self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs
    ) -> concurrent.futures.Future[T]:
        if not self._slots.acquire(blocking=False):
            with self._stats_lock:
                self.rejected += 1
            raise PoolOverloadedError(
                f"tokenization pool overloaded: {self.queue_size} requests already admitted"
            )
        admitted = time.perf_counter()
        try:
            future = self._executor.submit(fn, *args, **kwargs)
        except BaseException:
            self._slots.release()
            raise
        with self._stats_lock:
            self._in_flight += 1
        future.add_done_callback(lambda done: self._done(done, admitted))
        return future

    def _done(self, future: concurrent.futures.Future[Any], admitted: float) -> None:
        self._slots.release()
        elapsed = time.perf_counter() - admitted
        failed = future.cancelled() or future.exception() is not None
        with self._stats_lock:
            self._in_flight -= 1
            self.completed += 1
            self.failed += failed
            self._latency.observe(elapsed)

    def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn`` on a worker and wait for it (for synchronous callers)."""
        future = self._submit(fn, *args, **kwargs)
        try:
            return future.result(timeout=self.timeout)
        except concurrent.futures.TimeoutError:
            with self._stats_lock:
                self.timeouts += 1
            raise TokenizationTimeoutError(
                f"tokenization did not finish within {self.timeout:g} s"
            ) from None

    async def arun(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn`` on a worker without blocking the event loop."""
        future = asyncio.wrap_future(self._submit(fn, *args, **kwargs))
        try:
            return await asyncio.wait_for(future, timeout=self.timeout)
        except TimeoutError:
            with self._stats_lock:
                self.timeouts += 1
            raise TokenizationTimeoutError(
                f"tokenization did not finish within {self.timeout:g} s"
            ) from None

    def close(self) -> None:
        """Stop accepting work; running calls finish in the background."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def statistics(self) -> dict[str, Any]:
        """Counters for metrics: calls finished (``failed`` of them raised or were cancelled),
        refused, past their deadline, admitted and not finished, and their latency."""
        with self._stats_lock:
            return {
                "workers": self.workers,
                "queue_size": self.queue_size,
                "completed": self.completed,
                "failed": self.failed,
                "timeouts": self.timeouts,
                "rejected": self.rejected,
                "in_flight": self._in_flight,
                "latency": self._latency.snapshot(),
            }
