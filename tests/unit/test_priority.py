"""ReadPriority: ingest waits for active reads, bounded, then gets a burst of credit."""

from __future__ import annotations

import threading
import time

from kvcache.priority import ReadPriority


def test_ingest_does_not_wait_without_readers() -> None:
    gate = ReadPriority(max_wait=5.0)
    gate.yield_to_readers()  # returns at once: nothing to wait for
    assert gate.waits == 0


def test_ingest_waits_until_the_read_ends() -> None:
    gate = ReadPriority(max_wait=5.0)
    entered, release = threading.Event(), threading.Event()
    order: list[str] = []

    def reader() -> None:
        with gate.reading():
            entered.set()
            release.wait(5.0)
            order.append("read done")

    thread = threading.Thread(target=reader)
    thread.start()
    assert entered.wait(5.0)
    threading.Timer(0.05, release.set).start()
    gate.yield_to_readers()
    order.append("ingest resumed")
    thread.join(5.0)
    assert order == ["read done", "ingest resumed"]
    assert gate.waits == 1


def test_a_read_that_never_ends_only_delays_ingest_then_grants_a_burst() -> None:
    gate = ReadPriority(max_wait=0.01, burst=3)
    with gate.reading():
        gate.yield_to_readers()  # runs out after max_wait
        assert gate.waits == 1
        for _ in range(3):  # the burst: no waiting
            gate.yield_to_readers()
        assert gate.waits == 1
        started = time.monotonic()
        gate.yield_to_readers()
        assert gate.waits == 2
        assert time.monotonic() - started >= 0.005
