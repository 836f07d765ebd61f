"""Ingest: a separate publisher process streams vLLM 0.32 batches over tcp loopback.

Consumers, one at a time, all fed the same precomputed stream from the same sockets
(`bench.publisher`: one PUB per pod, which binds, as a vLLM engine does):

* a bare SUB socket that only counts messages (the transport floor);
* kvcache identity mode (sha256_cbor, seed "42", block 16: the engines' own keys) as the service
  runs it (1 shard, GIL switch interval 0.0005 s), with the default 5 ms interval, and 2 shards;
* kvcache dual-key mode: the same stream with kvcache configured for seed "7", so no hash
  matches and every BlockStored is re-keyed from its token ids (sha256_cbor, seed "7");
* NVIDIA Dynamo's standalone indexer (``python -m dynamo.indexer --threads 1``), one worker per
  pod endpoint (``--workers "1=tcp://...,2=tcp://..."``), the way Dynamo learns pod identity.

A trial runs: connect, probe until every pod's probe block is visible (PUB/SUB slow joiner),
then ``stream``; the time is from the publisher's first send (CLOCK_MONOTONIC, shared by the two
processes) until a query sees every pod's sentinel blocks, polled every `POLL_S` for kvcache
(index lookup) and Dynamo (``POST /query``) alike. Block rate = (stored + removed hashes) / time.
Each pod's events arrive in order, and the sentinel is each pod's last message.

Then: score_tokens latency on an 8k prompt while the publisher streams into kvcache at its
measured full rate, and an offline profile of kvcache's ingest path on the exact same frames.

    DYN_LOG=error python -m bench.ingest_bench [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import http.client
import importlib.util
import json
import os
import pstats
import queue
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import zmq

from bench.hashing_bench import prompt
from bench.publisher import MODEL, PROBE_TOKENS, SENTINEL_TOKENS
from bench.stats import median, percentile
from kvcache.blocks import PodEntry
from kvcache.config import Config
from kvcache.events.apply import EventApplier
from kvcache.events.decode import decode_frames
from kvcache.events.pipeline import IngestPipeline
from kvcache.events.schema import BlockRemoved, BlockStored, Message
from kvcache.events.subscriber import Subscriber
from kvcache.indexer import Indexer
from kvcache.service.app import new_event_loop

ROOT = Path(__file__).resolve().parent.parent
IDENTITY_SEED = "42"
DUAL_SEED = "7"
SCHEME = "sha256_cbor"
POLL_S = 0.005
TRIAL_TIMEOUT_S = 120.0
READY_TIMEOUT_S = 30.0
SERVICE_SWITCH_INTERVAL = 0.0005
TARGET_VS_DYNAMO = 1.5


@dataclass(frozen=True)
class Sizes:
    """How much to run."""

    pods: int
    stored_blocks: int
    capacity: int
    repeats: int
    load_seconds: float
    load_repeats: int
    idle_samples: int
    extra_trials: bool


QUICK = Sizes(
    pods=16,
    stored_blocks=60_000,
    capacity=2048,
    repeats=3,
    load_seconds=1.2,
    load_repeats=2,
    idle_samples=300,
    extra_trials=False,
)
FULL = Sizes(
    pods=32,
    stored_blocks=400_000,
    capacity=4096,
    repeats=5,
    load_seconds=4.0,
    load_repeats=3,
    idle_samples=1500,
    extra_trials=True,
)


# --------------------------------------------------------------------------------------------
# The publisher process
# --------------------------------------------------------------------------------------------


class Publisher:
    """`bench.publisher` as a subprocess, driven by JSON lines on its stdin/stdout."""

    def __init__(self, sizes: Sizes) -> None:
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.publisher",
                "--pods",
                str(sizes.pods),
                "--stored-blocks",
                str(sizes.stored_blocks),
                "--capacity",
                str(sizes.capacity),
            ],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # it exits by itself at EOF on stdin
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        assert self._process.stdout is not None
        threading.Thread(target=self._read, args=(self._process.stdout,), daemon=True).start()
        try:
            self.info = self.reply(timeout=180.0)
        except BaseException:
            self.close()
            raise
        self.endpoints: list[str] = self.info["endpoints"]
        self.pods: list[str] = [t.split("@")[1] for t in self.info["topics"]]
        self.block_ops: int = self.info["blocks_stored"] + self.info["blocks_removed"]

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)

    def send(self, **command: Any) -> None:
        """Write one command (the reply is read with `reply`)."""
        assert self._process.stdin is not None
        self._process.stdin.write(json.dumps(command) + "\n")
        self._process.stdin.flush()

    def reply(self, timeout: float = TRIAL_TIMEOUT_S) -> dict[str, Any]:
        """The next reply line."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError("publisher did not answer") from None
        if line is None:
            raise RuntimeError(f"publisher exited with {self._process.wait()}")
        result: dict[str, Any] = json.loads(line)
        if "error" in result:
            raise RuntimeError(result["error"])
        return result

    def command(self, **command: Any) -> dict[str, Any]:
        """Send a command and wait for its reply."""
        self.send(**command)
        return self.reply()

    def close(self) -> None:
        """Ask it to quit; kill it if it does not."""
        process = self._process
        if process.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.send(cmd="quit")
            try:
                process.wait(5.0)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5.0)


# --------------------------------------------------------------------------------------------
# Consumers
# --------------------------------------------------------------------------------------------


class Consumer(Protocol):
    """One thing that ingests the stream."""

    def start(self) -> None: ...

    def visible(self, tokens: list[int]) -> float | None:
        """When every pod was first seen holding all blocks of ``tokens`` (None: not yet)."""
        ...

    def settle(self) -> None:
        """Let the probe traffic drain before a timed stream."""
        ...

    def cpu_seconds(self) -> float: ...

    def check(self, publisher: Publisher) -> dict[str, Any]:
        """Figures that show the trial applied the whole stream (after the timed part)."""
        ...

    def stop(self) -> None: ...


class BareSub:
    """A SUB socket on a thread that only counts messages: the floor of the transport."""

    def __init__(self, endpoints: Sequence[str], pods: int, keep: bool = False) -> None:
        self._endpoints = endpoints
        self._pods = pods
        self.keep = keep
        """Keep the stream's frames (for the offline profile)."""
        self._socket: Any = None
        self.frames: list[list[bytes]] = []
        self._count = 0
        self._target: int | None = None
        self._done: float | None = None
        self._topics: set[bytes] = set()
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.expected = 0

    def start(self) -> None:
        self._socket = zmq.Context.instance().socket(zmq.SUB)
        self._socket.setsockopt(zmq.RCVHWM, 100_000)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        for endpoint in self._endpoints:
            self._socket.connect(endpoint)
        self._thread.start()

    def _run(self) -> None:
        sock = self._socket
        keep = self.keep
        while not self._stop.is_set():
            if not sock.poll(50):
                continue
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._count += 1
                target = self._target
                if target is None:
                    self._topics.add(frames[0])
                    self._last = time.monotonic()
                else:
                    if keep:
                        self.frames.append(frames)
                    if self._count >= target and self._done is None:
                        self._done = time.monotonic()
        sock.close(linger=0)

    def visible(self, tokens: list[int]) -> float | None:
        if tokens is PROBE_TOKENS:
            return time.monotonic() if len(self._topics) >= self._pods else None
        return self._done

    def settle(self) -> None:
        deadline = time.monotonic() + 5.0
        while time.monotonic() - self._last < 0.1 and time.monotonic() < deadline:
            time.sleep(0.01)
        self._target = self._count + self.expected

    def cpu_seconds(self) -> float:
        return time.process_time()

    def check(self, publisher: Publisher) -> dict[str, Any]:
        received = self._count - (self._target or 0) + self.expected
        return {"messages": received, "valid": received == publisher.info["messages"]}

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        elif self._socket is not None:
            self._socket.close(linger=0)


class Kvcache:
    """kvcache's own ingest path in this process: Subscriber -> IngestPipeline -> index."""

    def __init__(
        self,
        endpoints: Sequence[str],
        pods: Sequence[str],
        *,
        seed: str,
        shards: int = 1,
        switch_interval: float | None = None,
        on_loop: bool = False,
    ) -> None:
        self._endpoints = endpoints
        self._pods = frozenset(pods)
        self.seed = seed
        self.indexer = Indexer(
            Config.from_mapping({"hashing": {"scheme": SCHEME, "seed": seed, "block_size": 16}})
        )
        self.pipeline = IngestPipeline(
            self.indexer.index,
            self.indexer.scheme,
            shards=shards,
            priority=self.indexer.read_priority,
        )
        self.subscriber = Subscriber(self.pipeline.submit, connect=list(endpoints))
        self._keys: dict[int, list[int]] = {}
        self._switch = switch_interval
        self._saved_switch = sys.getswitchinterval()
        self._on_loop = on_loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None

    def start(self) -> None:
        if self._switch is not None:
            sys.setswitchinterval(self._switch)
        self.pipeline.start()
        if not self._on_loop:
            self.subscriber.start()
            return
        # As `kvcache serve` runs it: the socket read by callbacks on a (uv)loop, on the
        # loop's own thread here since this thread polls for the sentinels.
        started = threading.Event()

        def run() -> None:
            self._loop = loop = new_event_loop()
            self.subscriber.start(loop=loop)
            started.set()
            loop.run_forever()

        self._loop_thread = threading.Thread(target=run, name="bench-loop", daemon=True)
        self._loop_thread.start()
        if not started.wait(10.0):
            raise TimeoutError("the event loop did not start")

    def visible(self, tokens: list[int]) -> float | None:
        keys = self._keys.get(id(tokens))
        if keys is None:
            keys = self._keys[id(tokens)] = self.indexer.block_keys(tokens)
        hits = self.indexer.index.lookup(keys)
        if len(hits) == len(keys) and self._pods <= {entry.pod for entry in hits[-1]}:
            return time.monotonic()
        return None

    def settle(self) -> None:
        self.pipeline.drain(10.0)

    def cpu_seconds(self) -> float:
        return time.process_time()

    def check(self, publisher: Publisher) -> dict[str, Any]:
        self.pipeline.drain(30.0)
        stats = self.pipeline.statistics()
        index = self.indexer.index.statistics()
        info = publisher.info
        resident = info["blocks_stored"] - info["blocks_removed"] + len(self._pods)  # + probe
        modes = stats["pods_by_hash_mode"]
        mode = "identity" if self.seed == IDENTITY_SEED else "dual"
        valid = (
            stats["gaps"] == 0
            and stats["queue_overflow"] == 0
            and stats["blocks_removed"] == info["blocks_removed"]
            and index["entries"] == resident
            and modes[mode] == len(self._pods)
            and not stats["blocks_skipped"]
            and not stats["events_rejected"]
        )
        return {
            "valid": valid,
            "entries": index["entries"],
            "expected_entries": resident,
            "gaps": stats["gaps"],
            "queue_overflow": stats["queue_overflow"],
            "hash_modes": modes,
            "blocks_skipped": stats["blocks_skipped"],
        }

    def stop(self) -> None:
        self.subscriber.stop()
        loop = self._loop
        if loop is not None and self._loop_thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            self._loop_thread.join(10.0)
            loop.close()
        self.pipeline.stop()
        sys.setswitchinterval(self._saved_switch)


# Exec'd in the child: ask for SIGTERM when the bench process dies, even by SIGKILL (Linux
# PR_SET_PDEATHSIG survives exec), then become ``python -m dynamo.indexer``.
_DIE_WITH_PARENT = (
    "import contextlib, ctypes, os, signal, sys\n"
    "with contextlib.suppress(OSError, AttributeError):\n"
    "    ctypes.CDLL('libc.so.6').prctl(1, signal.SIGTERM)\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'dynamo.indexer', *sys.argv[1:]])\n"
)


def dynamo_available() -> bool:
    """Whether ``python -m dynamo.indexer`` can run (the bench extra installs it)."""
    try:
        return importlib.util.find_spec("dynamo.indexer") is not None
    except ImportError:
        return False


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Dynamo:
    """``python -m dynamo.indexer`` as a subprocess, one worker per pod endpoint."""

    def __init__(self, endpoints: Sequence[str], threads: int = 1) -> None:
        self._endpoints = endpoints
        self._threads = threads
        self._port = _free_port()
        self._conn: http.client.HTTPConnection | None = None
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop)
        self._process: subprocess.Popen[bytes] | None = None
        self._workers = {str(number + 1) for number in range(len(endpoints))}

    def start(self) -> None:
        workers = ",".join(
            f"{number + 1}={endpoint}" for number, endpoint in enumerate(self._endpoints)
        )
        command = [sys.executable, "-c", _DIE_WITH_PARENT, "--block-size", "16"]
        command += ["--port", str(self._port), "--threads", str(self._threads)]
        command += ["--model-name", MODEL, "--workers", workers]
        self._process = subprocess.Popen(
            command,
            env={**os.environ, "DYN_LOG": "error"},
            stdout=self._log,
            stderr=self._log,
            start_new_session=True,
        )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            try:
                status, _ = self._request("GET", "/health")
            except OSError:
                time.sleep(0.05)
                continue
            if status == 200:
                return
        self._log.seek(0)
        tail = self._log.read().decode(errors="replace")[-2000:]
        raise RuntimeError(f"dynamo.indexer did not become healthy: {tail}")

    def _request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        for attempt in range(2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection("127.0.0.1", self._port, timeout=30)
            try:
                payload = None if body is None else json.dumps(body)
                headers = {"Content-Type": "application/json"}
                self._conn.request(method, path, body=payload, headers=headers)
                response = self._conn.getresponse()
                return response.status, response.read()
            except (OSError, http.client.HTTPException):
                self._conn.close()
                self._conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def visible(self, tokens: list[int]) -> float | None:
        status, body = self._request("POST", "/query", {"token_ids": tokens, "model_name": MODEL})
        if status != 200:
            return None
        scores = json.loads(body).get("scores", {})
        full = {worker for worker, ranks in scores.items() if ranks.get("0") == len(tokens)}
        return time.monotonic() if self._workers <= full else None

    def settle(self) -> None:
        time.sleep(0.2)

    def cpu_seconds(self) -> float:
        import psutil

        assert self._process is not None
        times = psutil.Process(self._process.pid).cpu_times()
        return float(times.user + times.system)

    def check(self, publisher: Publisher) -> dict[str, Any]:
        status, body = self._request("GET", "/dump")
        blocks: Counter[int] = Counter()
        if status == 200:
            for group in json.loads(body).values():
                for record in group["events"]:
                    stored = record["event"]["data"].get("stored")
                    if stored:
                        blocks[record["worker_id"]] += len(stored["blocks"])
        info = publisher.info
        resident = info["blocks_stored"] - info["blocks_removed"] + len(self._workers)
        total = sum(blocks.values())
        return {"valid": total == resident, "entries": total, "expected_entries": resident}

    def stop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(5.0)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(5.0)
        self._log.close()


# --------------------------------------------------------------------------------------------
# Trials
# --------------------------------------------------------------------------------------------


def _wait_until(condition: Callable[[], float | None], timeout: float, what: str) -> float:
    deadline = time.monotonic() + timeout
    while True:
        seen = condition()
        if seen is not None:
            return seen
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(POLL_S)


def _probe_until_ready(publisher: Publisher, consumer: Consumer) -> int:
    deadline = time.monotonic() + READY_TIMEOUT_S
    rounds = 0
    while True:
        publisher.command(cmd="probe")
        rounds += 1
        with contextlib.suppress(TimeoutError):
            _wait_until(lambda: consumer.visible(PROBE_TOKENS), 0.05, "probe")
            return rounds
        if time.monotonic() > deadline:
            raise TimeoutError("consumer never saw every pod's probe (slow joiner?)")


def ingest_trial(publisher: Publisher, consumer: Consumer) -> dict[str, Any]:
    """Stream the whole workload into ``consumer`` once; time until its sentinels are visible."""
    try:
        consumer.start()
        rounds = _probe_until_ready(publisher, consumer)
        consumer.settle()
        cpu_before = consumer.cpu_seconds()
        publisher.send(cmd="stream")
        seen = _wait_until(
            lambda: consumer.visible(SENTINEL_TOKENS), TRIAL_TIMEOUT_S, "sentinel blocks"
        )
        cpu = consumer.cpu_seconds() - cpu_before
        sent = publisher.reply()
        elapsed = seen - sent["t_first"]
        ops = publisher.block_ops
        result = {
            "seconds": elapsed,
            "blocks_per_s": ops / elapsed,
            "stored_blocks_per_s": publisher.info["blocks_stored"] / elapsed,
            "cpu_s_per_m_block_ops": cpu / ops * 1e6,
            "publisher_send_s": sent["t_last"] - sent["t_first"],
            "publisher_blocks_per_s": ops / max(sent["t_last"] - sent["t_first"], 1e-9),
            "probe_rounds": rounds,
        }
        result.update(consumer.check(publisher))
        return result
    finally:
        consumer.stop()


def _median_of(trials: list[dict[str, Any]], key: str) -> float:
    return median([trial[key] for trial in trials])


def ingest(publisher: Publisher, sizes: Sizes) -> tuple[dict[str, Any], list[list[bytes]]]:
    """Every consumer once per repeat, interleaved; medians and same-repeat ratios."""
    endpoints, pods = publisher.endpoints, publisher.pods
    service = SERVICE_SWITCH_INTERVAL
    makers: dict[str, Callable[[], Consumer]] = {
        "bare_sub": lambda: BareSub(endpoints, len(pods)),
        "kvcache_identity": lambda: Kvcache(
            endpoints, pods, seed=IDENTITY_SEED, switch_interval=service
        ),
        "kvcache_dual": lambda: Kvcache(endpoints, pods, seed=DUAL_SEED, switch_interval=service),
        "kvcache_identity_default_switch": lambda: Kvcache(endpoints, pods, seed=IDENTITY_SEED),
        "kvcache_identity_on_loop": lambda: Kvcache(
            endpoints, pods, seed=IDENTITY_SEED, switch_interval=service, on_loop=True
        ),
        "kvcache_identity_2_shards": lambda: Kvcache(
            endpoints, pods, seed=IDENTITY_SEED, shards=2, switch_interval=service
        ),
    }
    dynamo = dynamo_available()
    if dynamo:
        makers["dynamo"] = lambda: Dynamo(endpoints)
        if sizes.extra_trials:
            makers["dynamo_2_threads"] = lambda: Dynamo(endpoints, threads=2)
    trials: dict[str, list[dict[str, Any]]] = {name: [] for name in makers}
    frames: list[list[bytes]] = []
    for repeat in range(sizes.repeats):
        for name, make in makers.items():
            consumer = make()
            if isinstance(consumer, BareSub):
                consumer.expected = publisher.info["messages"]
                if repeat == sizes.repeats - 1:
                    consumer.keep = True
            trials[name].append(ingest_trial(publisher, consumer))
            if isinstance(consumer, BareSub) and consumer.frames:
                frames = consumer.frames
            gc.collect()
    rates = {name: _median_of(runs, "blocks_per_s") for name, runs in trials.items()}

    def ratio(name: str, base: str = "dynamo") -> float | None:
        if base not in trials:
            return None
        return median(
            [
                a["blocks_per_s"] / b["blocks_per_s"]
                for a, b in zip(trials[name], trials[base], strict=True)
            ]
        )

    all_runs = [run for runs in trials.values() for run in runs]
    result: dict[str, Any] = {
        "blocks_per_s": rates,
        "identity_vs_dynamo": ratio("kvcache_identity"),
        "dual_vs_dynamo": ratio("kvcache_dual"),
        "identity_default_switch_vs_dynamo": ratio("kvcache_identity_default_switch"),
        "identity_2_shards_vs_dynamo": ratio("kvcache_identity_2_shards"),
        "identity_on_loop_vs_dynamo": ratio("kvcache_identity_on_loop"),
        "identity_on_loop_vs_thread": ratio("kvcache_identity_on_loop", "kvcache_identity"),
        "identity_1_shard_vs_2_shards": ratio("kvcache_identity", "kvcache_identity_2_shards"),
        "dual_vs_identity": ratio("kvcache_dual", "kvcache_identity"),
        "bare_sub_vs_identity": ratio("bare_sub", "kvcache_identity"),
        "cpu_s_per_m_block_ops": {
            name: _median_of(runs, "cpu_s_per_m_block_ops") for name, runs in trials.items()
        },
        "publisher_send_blocks_per_s": median([run["publisher_blocks_per_s"] for run in all_runs]),
        "all_trials_valid": all(run["valid"] for run in all_runs),
        "trials": trials,
    }
    if dynamo:
        result["identity_target_met"] = result["identity_vs_dynamo"] >= TARGET_VS_DYNAMO
    else:
        result["dynamo_error"] = "ai-dynamo-runtime (python -m dynamo.indexer) not importable"
    if "dynamo_2_threads" in trials:
        result["identity_vs_dynamo_2_threads"] = ratio("kvcache_identity", "dynamo_2_threads")
    return result, frames


# --------------------------------------------------------------------------------------------
# Scoring while ingest runs
# --------------------------------------------------------------------------------------------


def _score_samples(
    indexer: Indexer, tokens: list[int], count: int | None, seconds: float | None
) -> list[float]:
    """score_tokens latencies (GC left on, as in the service)."""
    samples: list[float] = []
    clock = time.perf_counter
    end = clock() + seconds if seconds is not None else float("inf")
    while (count is None or len(samples) < count) and clock() < end:
        started = clock()
        indexer.score_tokens(tokens)
        samples.append(clock() - started)
    return samples


def _scoring_condition(
    publisher: Publisher, sizes: Sizes, rate: float, shards: int, interval: float
) -> dict[str, Any]:
    consumer = Kvcache(
        publisher.endpoints,
        publisher.pods,
        seed=IDENTITY_SEED,
        shards=shards,
        switch_interval=interval,
    )
    try:
        consumer.start()
        _probe_until_ready(publisher, consumer)
        consumer.settle()
        indexer = consumer.indexer
        tokens = prompt()
        keys = indexer.block_keys(tokens)
        for number in range(8):  # 8 pods with prefixes of 64..512 blocks of the prompt
            indexer.index.add(None, keys[: 64 * (number + 1)], [PodEntry(f"scored-{number}")])
        assert indexer.score_tokens(tokens)["scored-7"] == 512.0
        idle: list[list[float]] = []
        busy: list[list[float]] = []
        applied: list[float] = []
        overflow = 0
        for _ in range(sizes.load_repeats):
            consumer.pipeline.drain(30.0)
            idle.append(_score_samples(indexer, tokens, sizes.idle_samples, None))
            publisher.send(cmd="paced", blocks_per_s=rate, seconds=sizes.load_seconds)
            time.sleep(0.3)
            before = consumer.pipeline.statistics()
            started = time.monotonic()
            busy.append(_score_samples(indexer, tokens, None, sizes.load_seconds - 0.5))
            after = consumer.pipeline.statistics()
            window = time.monotonic() - started
            publisher.reply()
            done = after["blocks_stored"] + after["blocks_removed"]
            done -= before["blocks_stored"] + before["blocks_removed"]
            applied.append(done / window)
            overflow += after["queue_overflow"] - before["queue_overflow"]
    finally:
        consumer.stop()

    def pct(runs: list[list[float]], fraction: float) -> float:
        return median([percentile(run, fraction) for run in runs]) * 1e3

    return {
        "shards": shards,
        "switch_interval_s": interval,
        "idle_p50_ms": pct(idle, 0.5),
        "idle_p99_ms": pct(idle, 0.99),
        "load_p50_ms": pct(busy, 0.5),
        "load_p99_ms": pct(busy, 0.99),
        "load_max_ms": max(max(run) for run in busy) * 1e3,
        "p50_load_over_idle": median(
            [percentile(b, 0.5) / percentile(i, 0.5) for i, b in zip(idle, busy, strict=True)]
        ),
        "p99_load_over_idle": median(
            [percentile(b, 0.99) / percentile(i, 0.99) for i, b in zip(idle, busy, strict=True)]
        ),
        "samples_idle": sum(len(run) for run in idle),
        "samples_load": sum(len(run) for run in busy),
        "ingest_blocks_per_s_during_scoring": median(applied),
        "queue_overflow": overflow,
    }


def scoring_under_load(publisher: Publisher, sizes: Sizes, rate: float) -> dict[str, Any]:
    """score_tokens (8k tokens, sha256_cbor) p50/p99 idle, and while the publisher streams at
    ``rate`` block operations/s into kvcache; GIL switch interval default vs the service's."""
    default = sys.getswitchinterval()
    conditions = {
        "service": (1, SERVICE_SWITCH_INTERVAL),
        "default_switch": (1, default),
    }
    if sizes.extra_trials:
        conditions["service_2_shards"] = (2, SERVICE_SWITCH_INTERVAL)
    results: dict[str, Any] = {"paced_blocks_per_s": rate}
    for label, (shards, interval) in conditions.items():
        results[label] = _scoring_condition(publisher, sizes, rate, shards, interval)
    return results


# --------------------------------------------------------------------------------------------
# Profile of kvcache's ingest path on the captured frames
# --------------------------------------------------------------------------------------------


class _Timed:
    """Wraps a bound method, accumulating calls and seconds."""

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func
        self.calls = 0
        self.seconds = 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return self.func(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started
            self.calls += 1


@contextlib.contextmanager
def _gc_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _apply_split(messages: list[Message], seed: str) -> dict[str, Any]:
    """Apply every message on a fresh index, timing the index calls, verification and re-keying."""
    indexer = Indexer(
        Config.from_mapping({"hashing": {"scheme": SCHEME, "seed": seed, "block_size": 16}})
    )
    index: Any = indexer.index
    applier: Any = EventApplier(index, indexer.scheme)
    timers = {name: _Timed(getattr(index, name)) for name in ("add", "evict", "request_key")}
    for name, timer in timers.items():
        setattr(index, name, timer)
    # verify (identity checks and the one-off mismatch per pod, which includes its own chain
    # extension and scheme detection) and rekey (dual mode: request keys from token ids).
    in_verify = [False]
    verify = timers["verify"] = _Timed(applier._verify)
    rekey = timers["rekey"] = _Timed(applier._chain.extend)
    extend = rekey.func

    def timed_verify(*args: Any) -> Any:
        in_verify[0] = True
        try:
            return verify(*args)
        finally:
            in_verify[0] = False

    def timed_extend(*args: Any) -> Any:
        return extend(*args) if in_verify[0] else rekey(*args)

    applier._verify = timed_verify
    applier._chain.extend = timed_extend
    with _gc_off():
        started = time.perf_counter()
        for message in messages:
            applier.apply(message)
        total = time.perf_counter() - started
    # The cost of the wrapper itself, to subtract from the "applier" remainder.
    noop = _Timed(lambda: None)
    wrap_started = time.perf_counter()
    for _ in range(100_000):
        noop()
    wrapper = (time.perf_counter() - wrap_started) / 100_000
    calls = sum(timer.calls for timer in timers.values())
    inside = {name: timer.seconds for name, timer in timers.items()}
    counted = sum(inside.values())
    return {
        "total_s": total,
        "seconds": inside,
        "calls": {name: timer.calls for name, timer in timers.items()},
        "applier_own_s": total - counted - calls * wrapper,
        "wrapper_overhead_s": calls * wrapper,
        "us_per_call": {
            name: timer.seconds / timer.calls * 1e6 for name, timer in timers.items() if timer.calls
        },
    }


def _add_cost(sizes: Sequence[int] = (1, 2, 8, 16, 32, 64, 128)) -> dict[str, float]:
    """Median µs per index.add call by batch size (fresh random keys, one pod, on an index
    already holding 100k keys), and per index.evict of one key."""
    from kvcache.blocks import KeyType

    indexer = Indexer(Config.from_mapping({"hashing": {"scheme": SCHEME, "seed": "42"}}))
    index = indexer.index
    entry = [PodEntry("10.0.0.1:8000", "gpu", False, 0)]
    rng = random.Random(5)
    for _ in range(1000):
        index.add(None, [rng.getrandbits(64) for _ in range(100)], entry)
    costs: dict[str, float] = {}
    clock = time.perf_counter
    evict_keys: list[int] = []
    with _gc_off():
        for size in sizes:
            samples = []
            for _ in range(max(100, 4000 // size)):
                batch = [rng.getrandbits(64) for _ in range(size)]
                started = clock()
                index.add(None, batch, entry)
                samples.append(clock() - started)
                if len(evict_keys) < 4000:
                    evict_keys += batch
            costs[f"add_{size}_us"] = median(samples) * 1e6
        samples = []
        for key in evict_keys:
            started = clock()
            index.evict(key, KeyType.REQUEST, entry)
            samples.append(clock() - started)
        costs["evict_1_us"] = median(samples) * 1e6
    return costs


def _shares(decode_s: float, split: dict[str, Any]) -> dict[str, float]:
    """Percent of decode + apply time per part."""
    seconds = split["seconds"]
    parts = {
        "decode_frames": decode_s,
        "index_add": seconds["add"],
        "index_evict": seconds["evict"],
        "index_request_key": seconds["request_key"],
        "verify": seconds["verify"],
        "rekey_from_tokens": seconds["rekey"],
        "applier_python": split["applier_own_s"],
        "timer_overhead": split["wrapper_overhead_s"],
    }
    total = decode_s + split["total_s"]
    return {name: value / total * 100 for name, value in parts.items()}


def _pipeline_seconds(frames: list[list[bytes]]) -> float:
    """The live path minus the transport: `IngestPipeline.submit` of every message, inline, as
    the receive thread runs it (identity pods decode into key runs); median of 3 passes."""
    runs = []
    for _ in range(3):
        indexer = Indexer(
            Config.from_mapping({"hashing": {"scheme": SCHEME, "seed": IDENTITY_SEED}})
        )
        pipeline = IngestPipeline(indexer.index, indexer.scheme, priority=indexer.read_priority)
        with _gc_off():
            started = time.perf_counter()
            for message in frames:
                pipeline.submit(message)
            runs.append(time.perf_counter() - started)
    return median(runs)


def profile(frames: list[list[bytes]], recv_us_per_message: float) -> dict[str, Any]:
    """Where kvcache's ingest time goes, single-threaded, on the captured stream.

    The split below follows the event path (every message decoded into events, as for a pod
    not yet verified); ``pipeline_*`` is the path identity pods take live.
    """
    pipeline_s = _pipeline_seconds(frames)
    with _gc_off():
        started = time.perf_counter()
        decoded = [decode_frames(message) for message in frames]
        decode_s = time.perf_counter() - started
    messages = [message for message in decoded if isinstance(message, Message)]
    stored_events = removed_events = stored_blocks = removed_blocks = 0
    adds_if_coalesced = 0
    per_message_stores: list[int] = []
    for message in messages:
        removed_events += message.batch.merged  # removals the fast path folded together
        stores = 0
        run = False
        for event in message.batch.events:
            if isinstance(event, BlockStored):
                stored_events += 1
                stores += 1
                stored_blocks += len(event.block_hashes)
                if not run:
                    adds_if_coalesced += 1
                run = True
            elif isinstance(event, BlockRemoved):
                removed_events += 1
                removed_blocks += len(event.block_hashes)
                run = False
        per_message_stores.append(stores)
    count = len(messages)
    ops = stored_blocks + removed_blocks
    identity = _apply_split(messages, IDENTITY_SEED)
    dual = _apply_split(messages, DUAL_SEED)

    # cProfile of identity-mode apply: the top functions by own time.
    indexer = Indexer(Config.from_mapping({"hashing": {"scheme": SCHEME, "seed": IDENTITY_SEED}}))
    applier = EventApplier(indexer.index, indexer.scheme)
    profiler = cProfile.Profile()
    profiler.enable()
    for message in messages:
        applier.apply(message)
    profiler.disable()
    stats = pstats.Stats(profiler)
    rows = []
    raw: Any = stats.stats  # type: ignore[attr-defined]
    for (filename, line, func), (_, ncalls, tottime, cumtime, _) in raw.items():
        rows.append((tottime, cumtime, ncalls, f"{Path(filename).name}:{line}:{func}"))
    rows.sort(reverse=True)
    top = [
        {"function": name, "calls": ncalls, "tottime_s": tottime, "cumtime_s": cumtime}
        for tottime, cumtime, ncalls, name in rows[:15]
    ]
    return {
        "messages": count,
        "stored_events": stored_events,
        "removed_events": removed_events,
        "stored_blocks": stored_blocks,
        "removed_blocks": removed_blocks,
        "stored_events_per_message": stored_events / count,
        "index_adds_per_message_if_coalesced": adds_if_coalesced / count,
        "recv_us_per_message": recv_us_per_message,
        "decode_us_per_message": decode_s / count * 1e6,
        "decode_s": decode_s,
        "apply_identity_s": identity["total_s"],
        "apply_dual_s": dual["total_s"],
        "single_thread_identity_blocks_per_s": ops / (decode_s + identity["total_s"]),
        "single_thread_dual_blocks_per_s": ops / (decode_s + dual["total_s"]),
        "pipeline_us_per_message": pipeline_s / count * 1e6,
        "single_thread_pipeline_blocks_per_s": ops / pipeline_s,
        "identity_breakdown_pct": _shares(decode_s, identity),
        "dual_breakdown_pct": _shares(decode_s, dual),
        "identity_split": identity,
        "dual_split": dual,
        "index_costs": _add_cost(),
        "cprofile_identity_top": top,
        "max_stored_events_in_a_message": max(per_message_stores),
    }


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def run(quick: bool = False) -> dict[str, Any]:
    """Ingest throughput vs Dynamo's indexer, scoring under ingest load, and the ingest profile."""
    sizes = QUICK if quick else FULL
    started = time.monotonic()
    publisher = Publisher(sizes)
    try:
        info = publisher.info
        result: dict[str, Any] = {
            "workload": {
                "wire": "vLLM 0.32 map-form events, [ts, events, 0] batches, u64 hashes",
                "keys": f"{SCHEME} seed {IDENTITY_SEED!r} block 16",
                "dual_mode": f"kvcache configured {SCHEME} seed {DUAL_SEED!r}: request keys",
                "pods": info["pods"],
                "messages": info["messages"],
                "blocks_stored": info["blocks_stored"],
                "blocks_removed": info["blocks_removed"],
                "events_stored": info["events_stored"],
                "events_removed": info["events_removed"],
                "payload_mb": info["payload_bytes"] / 1e6,
                "capacity_blocks_per_pod": sizes.capacity,
                "repeats": sizes.repeats,
                "generate_s": info["generate_s"],
                "poll_interval_s": POLL_S,
            }
        }
        ingest_result, frames = ingest(publisher, sizes)
        result["ingest"] = ingest_result
        rates = ingest_result["blocks_per_s"]
        result["identity_vs_dynamo"] = ingest_result["identity_vs_dynamo"]
        result["dual_vs_dynamo"] = ingest_result["dual_vs_dynamo"]
        scoring = scoring_under_load(publisher, sizes, rates["kvcache_identity"])
        result["scoring_under_load"] = scoring
        result["scoring_p99_under_load_ms"] = scoring["service"]["load_p99_ms"]
        result["scoring_p99_idle_ms"] = scoring["service"]["idle_p99_ms"]
        result["scoring_p99_under_load_vs_idle"] = scoring["service"]["p99_load_over_idle"]
        result["scoring_p99_under_load_default_switch_ms"] = scoring["default_switch"][
            "load_p99_ms"
        ]
    finally:
        publisher.close()
    bare = ingest_result["trials"]["bare_sub"]
    recv_us = median([trial["seconds"] / info["messages"] * 1e6 for trial in bare])
    result["profile"] = profile(frames, recv_us) if frames else {}
    result["seconds"] = time.monotonic() - started
    return result


def main() -> None:
    """Print the results as JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small sizes (harness check)")
    args = parser.parse_args()
    print(json.dumps(run(quick=args.quick), indent=2))


if __name__ == "__main__":
    main()
