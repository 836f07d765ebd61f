"""HTTP load: `POST /score_tokens` with 8k-token bodies while events stream in, in one run with
in-process `Indexer.score_tokens` and Dynamo's ``POST /query`` on the same prompts.

Processes (2 shared cores): `bench.publisher` (a fake vLLM 0.32 fleet, one PUB per pod), a real
``kvcache serve`` (sha256_cbor, seed "42", block 16: the fleet's own keys, so identity mode) and
``python -m dynamo.indexer --threads 1``, both dialling every pod's endpoint, and this process:
the load generator, plus `SCORED_PODS` PUB sockets of its own whose pods cache prefixes of the
prompts (so every answer has a known winner, and is checked).

Both services stay up for the whole run and ingest the same stream. The measurement windows run
while the publisher streams paced at `RATE` block operations/s into both of them (the ``_idle``
ones with the publisher quiet, to separate HTTP cost from ingest interference):

* ``in_process``: `Indexer.score_tokens` in this process on an index holding the same prefixes,
  under the same machine load (this index does not ingest);
* ``kvcache``: ``POST /score_tokens`` ``{"token_ids": [8192 ids], "model": ...}``;
* ``dynamo``: ``POST /query`` ``{"token_ids": [8192 ids], "model_name": ...}`` (Dynamo hashes the
  token ids itself: per-block xxh3 in Rust, unchained, where kvcache computes vLLM's chained
  sha256_cbor keys);
* ``floor``: the same requests to `bench.null_http`, a server on the same stack that only reads
  them and answers ``{}``: the transport floor (kernel copies, wake-ups, the client), so that
  kvcache's p50 minus the floor's is what kvcache itself adds;
* ``*_wrk``: the same c1 windows driven by wrk (bench/wrk.py) instead of this module's client;
* ``*_pinned``: idle c1 windows with the client and both servers on one core, which removes the
  scheduler's placement noise (a 58 KB request costs ~0.015 ms on one core, ~0.1 ms across two,
  and which one a window gets varies): each side's CPU work per request, compared.

The client is this module's own: raw sockets, HTTP/1.1 keep-alive, request bytes built once, one
closed-loop connection per thread (``c1``: one connection, for latency; ``c4``: four, for
throughput); wrk windows cross-check it (both give the same p50 on this machine). Client time
is inside every HTTP figure, equally for both services. An answer
counts as an error unless it is a 200 whose scores name the prompt's expected winner with all of
its blocks. Windows rotate through the conditions once per repeat; figures are medians over
repeats and ratios are taken within a repeat.

    DYN_LOG=error python -m bench.load_bench [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any, Protocol

import zmq

from bench import ingest_bench, wrk
from bench.hashing_bench import prompt
from bench.publisher import MODEL, PROBE_TOKENS, encode_batch, stored
from bench.stats import median, percentile
from kvcache.blocks import PodEntry
from kvcache.config import Config
from kvcache.hashing import VllmScheme
from kvcache.indexer import Indexer

SCHEME, SEED, BLOCK = "sha256_cbor", "42", 16
RATE = 100_000.0
"""Block operations (stored + removed) per second the publisher streams during every window."""
PROMPTS = 4
SCORED_PODS = 4
PROMPT_BLOCKS = 512  # 8192 tokens
LEAD_IN_S = 0.3  # the stream runs this long before and after the load of a window
READY_TIMEOUT_S = 60.0
TARGET_VS_IN_PROCESS = 2.0


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much to run."""

    pods: int
    stored_blocks: int
    window_s: float
    repeats: int
    floor_requests: int


QUICK = Sizes(pods=8, stored_blocks=20_000, window_s=1.5, repeats=2, floor_requests=200)
FULL = Sizes(pods=16, stored_blocks=40_000, window_s=2.0, repeats=5, floor_requests=500)


# --------------------------------------------------------------------------------------------
# The load generator
# --------------------------------------------------------------------------------------------


def http_request(method: str, path: str, body: bytes = b"") -> bytes:
    """A keep-alive HTTP/1.1 request, as bytes to send as they are."""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:\s*chunked", re.IGNORECASE)


class Connection:
    """One keep-alive connection: send a prepared request, read one response (sized or chunked)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def _fill(self) -> None:
        data = self.sock.recv(262_144)
        if not data:
            raise ConnectionError("server closed the connection")
        self.buffer += data

    def _until(self, marker: bytes) -> bytes:
        while (end := self.buffer.find(marker)) < 0:
            self._fill()
        found, self.buffer = self.buffer[:end], self.buffer[end + len(marker) :]
        return found

    def _exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._fill()
        found, self.buffer = self.buffer[:size], self.buffer[size:]
        return found

    def request(self, raw: bytes) -> tuple[int, bytes]:
        """Status and body of the response to ``raw``."""
        self.sock.sendall(raw)
        head = self._until(b"\r\n\r\n")
        status = int(head[9:12])
        length = _LENGTH.search(head)
        if length is not None:
            return status, self._exactly(int(length.group(1)))
        if _CHUNKED.search(head) is None:
            raise ConnectionError("response has neither Content-Length nor chunked encoding")
        chunks = []
        while size := int(self._until(b"\r\n").split(b";")[0], 16):
            chunks.append(self._exactly(size))
            self._exactly(2)
        self._until(b"\r\n")  # the (empty) trailer section
        return status, b"".join(chunks)

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


@dataclasses.dataclass
class LoadResult:
    """One window of closed-loop load."""

    latencies: list[float]
    errors: int
    seconds: float
    first_error: str | None = None

    def figures(self) -> dict[str, Any]:
        """Throughput, p50/p99 in ms, errors."""
        ok = self.latencies
        return {
            "requests": len(ok) + self.errors,
            "errors": self.errors,
            "first_error": self.first_error,
            "throughput_rps": len(ok) / self.seconds,
            "p50_ms": percentile(ok, 0.5) * 1e3 if ok else None,
            "p99_ms": percentile(ok, 0.99) * 1e3 if ok else None,
            "mean_ms": sum(ok) / len(ok) * 1e3 if ok else None,
        }


Check = Callable[[int, int, bytes], str | None]
"""(prompt number, status, body) -> None when the answer is right, else what is wrong."""


class Window(Protocol):
    """One measured window: the Python client's `LoadResult`, or wrk's."""

    def figures(self) -> dict[str, Any]: ...


Measure = Callable[[], Window]


def load(
    port: int,
    requests: Sequence[bytes],
    check: Check,
    *,
    connections: int,
    seconds: float,
) -> LoadResult:
    """``connections`` closed loops over ``requests`` (round robin) for ``seconds``."""
    clock = time.perf_counter
    results: list[LoadResult] = []
    lock = threading.Lock()
    start = threading.Barrier(connections)

    def worker(offset: int) -> None:
        latencies: list[float] = []
        errors = 0
        first: str | None = None
        conn = Connection(port)
        start.wait()
        end = clock() + seconds
        number = offset
        try:
            while (now := clock()) < end:
                which = number % len(requests)
                number += 1
                try:
                    status, body = conn.request(requests[which])
                except OSError as exc:
                    errors += 1
                    first = first or f"{type(exc).__name__}: {exc}"
                    conn.close()
                    try:
                        conn = Connection(port)
                    except OSError:
                        break  # the server is gone: the window ends with its errors
                    continue
                took = clock() - now  # the answer's check is not the server's time
                problem = check(which, status, body)
                if problem is None:
                    latencies.append(took)
                else:
                    errors += 1
                    first = first or problem
        finally:
            conn.close()
        with lock:
            results.append(LoadResult(latencies, errors, seconds, first))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return LoadResult(
        [t for r in results for t in r.latencies],
        sum(r.errors for r in results),
        seconds,
        next((r.first_error for r in results if r.first_error), None),
    )


# --------------------------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------------------------

# Exec'd in the child: SIGTERM when the bench process dies, even by SIGKILL (PR_SET_PDEATHSIG
# survives exec), then become ``python <args>``.
_DIE_WITH_PARENT = (
    "import contextlib, ctypes, os, signal, sys\n"
    "with contextlib.suppress(OSError, AttributeError):\n"
    "    ctypes.CDLL('libc.so.6').prctl(1, signal.SIGTERM)\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n"
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Server:
    """A Python HTTP service as a subprocess, started on a free port."""

    def __init__(self, name: str, args: Sequence[str], health: str) -> None:
        self.name = name
        self.port = _free_port()
        self._log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop)
        argv = [a.replace("{port}", str(self.port)) for a in args]
        self.process = subprocess.Popen(
            [sys.executable, "-c", _DIE_WITH_PARENT, *argv],
            env={**os.environ, "DYN_LOG": "error", "PYTHONUNBUFFERED": "1"},
            stdout=self._log,
            stderr=self._log,
            start_new_session=True,
        )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while self.process.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if self.get(health)[0] == 200:
                    return
            time.sleep(0.05)
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"{name} did not become healthy: {tail}")

    def get(self, path: str) -> tuple[int, bytes]:
        """One request on a fresh connection."""
        conn = Connection(self.port)
        try:
            return conn.request(http_request("GET", path))
        finally:
            conn.close()

    def post(self, path: str, body: Any) -> tuple[int, bytes]:
        """One JSON POST on a fresh connection."""
        conn = Connection(self.port)
        try:
            return conn.request(http_request("POST", path, json.dumps(body).encode()))
        finally:
            conn.close()

    def log_tail(self) -> str:
        """The end of the process's output."""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-2000:]

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10.0)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5.0)
        self._log.close()


def kvcache_server(endpoints: Sequence[str]) -> Server:
    """``kvcache serve`` dialling every engine endpoint, hashing as the fleet does."""
    args = ["-m", "kvcache.service.cli", "serve", "--http-port", "{port}"]
    args += ["--hash-scheme", SCHEME, "--hash-seed", SEED, "--block-size", str(BLOCK)]
    args += ["--log-level", "warning"]
    for endpoint in endpoints:
        args += ["--zmq-connect", endpoint]
    return Server("kvcache serve", args, "/healthz")


def floor_server() -> Server:
    """The transport floor (bench/null_http.py): reads each request, answers ``{}``."""
    return Server("null HTTP server", ["-m", "bench.null_http", "--port", "{port}"], "/healthz")


def dynamo_server(workers: Mapping[int, str]) -> Server:
    """``python -m dynamo.indexer --threads 1`` with one worker id per engine endpoint."""
    listing = ",".join(f"{worker}={endpoint}" for worker, endpoint in workers.items())
    args = ["-m", "dynamo.indexer", "--block-size", str(BLOCK), "--port", "{port}"]
    args += ["--threads", "1", "--model-name", MODEL, "--workers", listing]
    return Server("dynamo.indexer", args, "/health")


# --------------------------------------------------------------------------------------------
# The prompts and the pods that cache them
# --------------------------------------------------------------------------------------------


def prefix_blocks(pod: int, prompt_number: int) -> int:
    """Blocks of prompt ``prompt_number`` that scored pod ``pod`` caches: each prompt has a
    different winner holding all of it, and the other pods hold 1/4, 2/4, 3/4."""
    return ((pod + prompt_number) % SCORED_PODS + 1) * PROMPT_BLOCKS // SCORED_PODS


def winner(prompt_number: int) -> int:
    """The scored pod that holds all of the prompt."""
    return (SCORED_PODS - 1 - prompt_number) % SCORED_PODS


def scored_pod_id(pod: int) -> str:
    """Pod id of scored pod ``pod`` (its topic is ``kv@<pod>@<model>``)."""
    return f"10.9.0.{pod}:8000"


class ScoredPods:
    """`SCORED_PODS` engines in this process, one PUB each, caching prefixes of the prompts."""

    def __init__(self, prompts: Sequence[list[int]]) -> None:
        self.context: zmq.Context[Any] = zmq.Context()
        self.sockets: list[Any] = []
        self.endpoints: list[str] = []
        self.seq = [0] * SCORED_PODS
        scheme = VllmScheme(SCHEME, seed=SEED, block_size=BLOCK)
        self.prompts = list(prompts)
        self.keys = [scheme.block_keys(tokens) for tokens in prompts]
        self.payloads: list[bytes] = []
        for pod in range(SCORED_PODS):
            sock = self.context.socket(zmq.PUB)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind("tcp://127.0.0.1:0")
            self.sockets.append(sock)
            self.endpoints.append(sock.getsockopt_string(zmq.LAST_ENDPOINT))
            events: list[Any] = []
            for number, tokens in enumerate(prompts):
                blocks = prefix_blocks(pod, number)
                events.append(stored(self.keys[number][:blocks], None, tokens[: blocks * BLOCK]))
            self.payloads.append(encode_batch(events, time.time()))

    def publish(self) -> None:
        """Every pod's stores once more (PUB drops what it sends before a SUB has joined)."""
        for pod, sock in enumerate(self.sockets):
            topic = f"kv@{scored_pod_id(pod)}@{MODEL}".encode()
            sock.send_multipart([topic, self.seq[pod].to_bytes(8, "big"), self.payloads[pod]])
            self.seq[pod] += 1

    def close(self) -> None:
        """Close the sockets."""
        self.context.destroy(linger=0)


# --------------------------------------------------------------------------------------------
# What a right answer is
# --------------------------------------------------------------------------------------------


def kvcache_check(number: int, status: int, body: bytes) -> str | None:
    """A 200 whose raw scores give the prompt's winner all of its blocks."""
    if status != 200:
        return f"status {status}: {body[:200]!r}"
    scores = json.loads(body)["scores"]
    if scores.get(scored_pod_id(winner(number))) != float(PROMPT_BLOCKS):
        return f"wrong scores for prompt {number}: {scores}"
    return None


def floor_check(number: int, status: int, body: bytes) -> str | None:
    """The null server's fixed answer."""
    return None if status == 200 and body == b"{}" else f"status {status}: {body[:200]!r}"


def dynamo_check(number: int, status: int, body: bytes) -> str | None:
    """A 200 whose scores give the winner's worker every token (Dynamo counts tokens)."""
    if status != 200:
        return f"status {status}: {body[:200]!r}"
    scores = json.loads(body).get("scores", {})
    worker = str(SCORED_WORKER_BASE + winner(number))
    if scores.get(worker, {}).get("0") != PROMPT_BLOCKS * BLOCK:
        return f"wrong scores for prompt {number}: {scores}"
    return None


SCORED_WORKER_BASE = 1_000
"""Dynamo worker id of scored pod 0 (the publisher's pods are workers 1..N)."""


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _in_process(
    prompts: Sequence[list[int]], keys: Sequence[list[int]], seconds: float
) -> Callable[[], LoadResult]:
    """An Indexer holding the same prefixes, and a function timing score_tokens for a window."""
    indexer = Indexer(
        Config.from_mapping({"hashing": {"scheme": SCHEME, "seed": SEED, "block_size": BLOCK}})
    )
    for pod in range(SCORED_PODS):
        entry = [PodEntry(scored_pod_id(pod))]
        for number in range(len(prompts)):
            indexer.index.add(None, keys[number][: prefix_blocks(pod, number)], entry)

    def window() -> LoadResult:
        clock = time.perf_counter
        latencies: list[float] = []
        errors = 0
        end = clock() + seconds
        number = 0
        while (now := clock()) < end:
            which = number % len(prompts)
            number += 1
            scores = indexer.score_tokens(prompts[which])
            latencies.append(clock() - now)
            errors += scores.get(scored_pod_id(winner(which))) != float(PROMPT_BLOCKS)
        return LoadResult(latencies, errors, seconds)

    return window


def _pinned(measure: Measure, servers: Sequence[Server]) -> Measure:
    """``measure`` with this thread (so the client threads it starts) and every thread of
    ``servers`` on one core, then everything back where it was."""

    def run() -> Window:
        core = {min(os.sched_getaffinity(0))}
        tasks = [
            int(task)
            for server in servers
            for task in os.listdir(f"/proc/{server.process.pid}/task")
        ]
        saved = {task: os.sched_getaffinity(task) for task in tasks}
        mine = os.sched_getaffinity(0)
        try:
            for task in tasks:
                with contextlib.suppress(OSError):  # a thread that ended meanwhile
                    os.sched_setaffinity(task, core)
            os.sched_setaffinity(0, core)
            return measure()
        finally:
            os.sched_setaffinity(0, mine)
            for task, cpus in saved.items():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(task, cpus)

    return run


@dataclasses.dataclass
class _WrkWindow:
    figures_: dict[str, Any]

    def figures(self) -> dict[str, Any]:
        return self.figures_


def _wrk(port: int, path: str, bodies: list[bytes], seconds: float) -> Measure:
    """A window of wrk's closed loop, figured as the Python client's windows are."""

    def measure() -> _WrkWindow:
        figures = wrk.run(port, path, bodies, seconds)
        error = figures.pop("error", None)
        base = {"p50_ms": None, "p99_ms": None, "throughput_rps": 0.0, "requests": 0}
        return _WrkWindow({**base, "errors": 1 if error else 0, **figures, "first_error": error})

    return measure


def _metric(server: Server, name: str) -> float:
    status, body = server.get("/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    match = re.search(rf"^{re.escape(name)} (\S+)$", body.decode(), re.MULTILINE)
    return float(match.group(1)) if match else 0.0


_SCORED = 'kvcache_http_request_duration_seconds_{}{{route="/score_tokens",status="200"}}'


def _served(kvcache: Server) -> tuple[float, float]:
    """kvcache's own time answering /score_tokens so far: (seconds, requests), from /metrics."""
    return _metric(kvcache, _SCORED.format("sum")), _metric(kvcache, _SCORED.format("count"))


def _ingested(kvcache: Server) -> float:
    return _metric(kvcache, "kvcache_blocks_stored_total") + _metric(
        kvcache, "kvcache_blocks_removed_total"
    )


def _floor(server: Server, path: str, count: int) -> float:
    """p50 of ``count`` GETs of a trivial route (the HTTP round trip alone), in ms."""
    conn = Connection(server.port)
    raw = http_request("GET", path)
    samples = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            conn.request(raw)
            samples.append(time.perf_counter() - started)
    finally:
        conn.close()
    return median(samples) * 1e3


def run(quick: bool = False) -> dict[str, Any]:
    """The load test; see the module docstring."""
    sizes = QUICK if quick else FULL
    started = time.monotonic()
    prompts = [prompt(seed=100 + n, length=PROMPT_BLOCKS * BLOCK) for n in range(PROMPTS)]
    fleet_sizes = dataclasses.replace(
        ingest_bench.QUICK, pods=sizes.pods, stored_blocks=sizes.stored_blocks
    )
    publisher = ingest_bench.Publisher(fleet_sizes)
    scored = ScoredPods(prompts)
    servers: list[Server] = []
    try:
        kvcache = kvcache_server([*publisher.endpoints, *scored.endpoints])
        servers.append(kvcache)
        floor = floor_server()
        servers.append(floor)
        dynamo: Server | None = None
        if ingest_bench.dynamo_available():
            workers = {n + 1: endpoint for n, endpoint in enumerate(publisher.endpoints)}
            workers |= {SCORED_WORKER_BASE + n: e for n, e in enumerate(scored.endpoints)}
            dynamo = dynamo_server(workers)
            servers.append(dynamo)
        result = _measure(sizes, publisher, scored, prompts, kvcache, dynamo, floor)
    finally:
        for server in servers:
            server.stop()
        scored.close()
        publisher.close()
    result["seconds"] = time.monotonic() - started
    return result


def _wait_ready(
    publisher: ingest_bench.Publisher,
    scored: ScoredPods,
    kvcache: Server,
    dynamo: Server | None,
) -> int:
    """Probe until both services hold every fleet pod's probe block and the scored prefixes
    (PUB/SUB slow joiner: anything sent before a SUB joined is lost); returns the rounds."""
    fleet = set(publisher.pods)
    workers = {str(n + 1) for n in range(len(fleet))}

    def kvcache_ready() -> bool:
        status, body = kvcache.post("/score_tokens", {"token_ids": PROBE_TOKENS})
        if status != 200 or not fleet <= set(json.loads(body)["scores"]):
            return False
        for number, tokens in enumerate(scored.prompts):
            answer = kvcache.post("/score_tokens", {"token_ids": tokens, "model": MODEL})
            if kvcache_check(number, *answer) is not None:
                return False
        return True

    def dynamo_ready() -> bool:
        if dynamo is None:
            return True
        status, body = dynamo.post("/query", {"token_ids": PROBE_TOKENS, "model_name": MODEL})
        if status != 200:
            return False
        scores = json.loads(body).get("scores", {})
        if not all(scores.get(w, {}).get("0") == len(PROBE_TOKENS) for w in workers):
            return False
        for number, tokens in enumerate(scored.prompts):
            answer = dynamo.post("/query", {"token_ids": tokens, "model_name": MODEL})
            if dynamo_check(number, *answer) is not None:
                return False
        return True

    rounds = 0
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        publisher.command(cmd="probe")
        scored.publish()
        rounds += 1
        time.sleep(0.2)
        if kvcache_ready() and dynamo_ready():
            return rounds
        if time.monotonic() > deadline:
            raise TimeoutError("the services never saw every pod's probe and prefixes")


def _measure(  # noqa: PLR0917 (private; one call site)
    sizes: Sizes,
    publisher: ingest_bench.Publisher,
    scored: ScoredPods,
    prompts: Sequence[list[int]],
    kvcache: Server,
    dynamo: Server | None,
    floor: Server,
) -> dict[str, Any]:
    rounds = _wait_ready(publisher, scored, kvcache, dynamo)
    kv_bodies = [json.dumps({"token_ids": t, "model": MODEL}).encode() for t in prompts]
    dyn_bodies = [json.dumps({"token_ids": t, "model_name": MODEL}).encode() for t in prompts]
    kv_requests = [http_request("POST", "/score_tokens", body) for body in kv_bodies]
    dyn_requests = [http_request("POST", "/query", body) for body in dyn_bodies]
    in_process = _in_process(prompts, scored.keys, sizes.window_s)
    window = sizes.window_s

    def http(port: int, requests: list[bytes], check: Check, connections: int) -> Measure:
        return lambda: load(port, requests, check, connections=connections, seconds=window)

    # name -> (measurement, whether the publisher streams meanwhile)
    conditions: dict[str, tuple[Measure, bool]] = {
        "in_process": (in_process, True),
        "kvcache_c1": (http(kvcache.port, kv_requests, kvcache_check, 1), True),
        "kvcache_c4": (http(kvcache.port, kv_requests, kvcache_check, 4), True),
        "in_process_idle": (in_process, False),
        "kvcache_c1_idle": (http(kvcache.port, kv_requests, kvcache_check, 1), False),
        # The same requests to a server that only reads them: what moving the bytes costs.
        "floor_c1": (http(floor.port, kv_requests, floor_check, 1), True),
        "floor_c1_idle": (http(floor.port, kv_requests, floor_check, 1), False),
    }
    if dynamo is not None:
        conditions["dynamo_c1"] = (http(dynamo.port, dyn_requests, dynamo_check, 1), True)
        conditions["dynamo_c4"] = (http(dynamo.port, dyn_requests, dynamo_check, 4), True)
        conditions["dynamo_c1_idle"] = (http(dynamo.port, dyn_requests, dynamo_check, 1), False)
    if wrk.command() is not None:  # the same c1 windows from a C client (bench/wrk.py)
        conditions["kvcache_c1_wrk"] = (
            _wrk(kvcache.port, "/score_tokens", kv_bodies, window),
            True,
        )
        if dynamo is not None:
            conditions["dynamo_c1_wrk"] = (_wrk(dynamo.port, "/query", dyn_bodies, window), True)
    if hasattr(os, "sched_setaffinity") and dynamo is not None:
        # Idle, the client and both servers on one core: no cross-core hand-off and none of
        # the scheduler's placement noise, only each side's CPU work per request.
        conditions["kvcache_c1_pinned"] = (
            _pinned(http(kvcache.port, kv_requests, kvcache_check, 1), [kvcache, dynamo]),
            False,
        )
        conditions["dynamo_c1_pinned"] = (
            _pinned(http(dynamo.port, dyn_requests, dynamo_check, 1), [kvcache, dynamo]),
            False,
        )
    # Warm both servers and this process's code paths up (not recorded).
    load(kvcache.port, kv_requests, kvcache_check, connections=1, seconds=0.3)
    if dynamo is not None:
        load(dynamo.port, dyn_requests, dynamo_check, connections=1, seconds=0.3)

    windows: dict[str, list[dict[str, Any]]] = {name: [] for name in conditions}
    floors: dict[str, list[float]] = {"kvcache_healthz": [], "dynamo_health": []}
    for _ in range(sizes.repeats):
        for name, (measure, paced) in conditions.items():
            timed = name.startswith("kvcache_c1")  # kvcache's own time, from its /metrics
            if paced:
                publisher.send(cmd="paced", blocks_per_s=RATE, seconds=window + 2 * LEAD_IN_S)
                time.sleep(LEAD_IN_S)
                before, t0 = _ingested(kvcache), time.monotonic()
            served = _served(kvcache) if timed else (0.0, 0.0)
            figures = measure().figures()
            if timed:
                spent, answered = (b - a for a, b in zip(served, _served(kvcache), strict=True))
                figures["server_mean_ms"] = spent / answered * 1e3 if answered else None
            if paced:
                figures["kvcache_ingest_blocks_per_s"] = (_ingested(kvcache) - before) / (
                    time.monotonic() - t0
                )
                publisher.reply()
            windows[name].append(figures)
        floors["kvcache_healthz"].append(_floor(kvcache, "/healthz", sizes.floor_requests))
        if dynamo is not None:
            floors["dynamo_health"].append(_floor(dynamo, "/health", sizes.floor_requests))
    return _summary(sizes, rounds, windows, floors, kvcache)


def _summary(
    sizes: Sizes,
    rounds: int,
    windows: dict[str, list[dict[str, Any]]],
    floors: dict[str, list[float]],
    kvcache: Server,
) -> dict[str, Any]:
    def med(name: str, key: str) -> float | None:
        values = [w[key] for w in windows[name]]
        return None if None in values else median(values)

    def ratio(a: str, b: str, key: str = "p50_ms", b_key: str | None = None) -> float | None:
        if a not in windows or b not in windows:
            return None
        other = b_key or key
        pairs = list(zip(windows[a], windows[b], strict=True))
        if any(x.get(key) is None or y.get(other) is None for x, y in pairs):
            return None  # a window without one successful request
        return median([x[key] / y[other] for x, y in pairs])

    conditions = {
        name: {
            "p50_ms": med(name, "p50_ms"),
            "p99_ms": med(name, "p99_ms"),
            "throughput_rps": med(name, "throughput_rps"),
            "requests": sum(w["requests"] for w in runs),
            "errors": sum(w["errors"] for w in runs),
            "first_error": next((w["first_error"] for w in runs if w["first_error"]), None),
        }
        for name, runs in windows.items()
    }
    for name, runs in windows.items():
        if "kvcache_ingest_blocks_per_s" in runs[0]:
            conditions[name]["kvcache_ingest_blocks_per_s"] = med(
                name, "kvcache_ingest_blocks_per_s"
            )
    over_in_process = ratio("kvcache_c1", "in_process")
    vs_dynamo = ratio("kvcache_c1", "dynamo_c1")
    idle_over_in_process = ratio("kvcache_c1_idle", "in_process_idle")
    pods = json.loads(kvcache.get("/pods")[1])["pods"]
    result: dict[str, Any] = {
        "workload": {
            "prompt_tokens": PROMPT_BLOCKS * BLOCK,
            "prompts": PROMPTS,
            "scored_pods": SCORED_PODS,
            "fleet_pods": sizes.pods,
            "keys": f"{SCHEME} seed {SEED!r} block {BLOCK}",
            "paced_blocks_per_s": RATE,
            "window_s": sizes.window_s,
            "repeats": sizes.repeats,
            "client": "raw-socket HTTP/1.1 keep-alive, closed loop per connection (Python)",
            "probe_rounds": rounds,
        },
        "conditions": conditions,
        "floor_p50_ms": {name: median(v) for name, v in floors.items() if v},
        "http_p50_over_in_process": over_in_process,
        "http_target_met": over_in_process is not None and over_in_process <= TARGET_VS_IN_PROCESS,
        "idle_http_p50_over_in_process": idle_over_in_process,
        "idle_kvcache_p50_over_dynamo": ratio("kvcache_c1_idle", "dynamo_c1_idle"),
        "kvcache_p50_over_dynamo": vs_dynamo,
        "kvcache_throughput_over_dynamo": ratio("kvcache_c4", "dynamo_c4", "throughput_rps"),
        "faster_than_dynamo": None if vs_dynamo is None else vs_dynamo < 1.0,
        # What HTTP adds to a score (HTTP p50 - in-process p50), against the in-process p50.
        "http_overhead_ms": _overhead(windows["kvcache_c1"], windows["in_process"]),
        "http_overhead_over_in_process": None if over_in_process is None else over_in_process - 1.0,
        "wrk_kvcache_p50_over_dynamo": ratio("kvcache_c1_wrk", "dynamo_c1_wrk"),
        "pinned_kvcache_p50_over_dynamo": ratio("kvcache_c1_pinned", "dynamo_c1_pinned"),
        "wrk_http_p50_over_in_process": ratio("kvcache_c1_wrk", "in_process"),
        # What kvcache adds beyond moving the bytes (HTTP p50 - the null server's p50, per
        # repeat), against the in-process score: the server's own overhead plus the scoring.
        "transport_floor_p50_ms": conditions["floor_c1"]["p50_ms"],
        # kvcache's own time per answer (request read in full -> response ready, its /metrics)
        # against the in-process score, both means: what the server adds, without the wire.
        "server_mean_ms": med("kvcache_c1", "server_mean_ms"),
        "server_mean_over_in_process": ratio(
            "kvcache_c1", "in_process", "server_mean_ms", "mean_ms"
        ),
        "idle_server_mean_over_in_process": ratio(
            "kvcache_c1_idle", "in_process_idle", "server_mean_ms", "mean_ms"
        ),
        "http_over_floor_ms": _overhead(windows["kvcache_c1"], windows["floor_c1"]),
        "http_over_floor_over_in_process": _share(windows, "kvcache_c1", "floor_c1", "in_process"),
        "idle_http_over_floor_over_in_process": _share(
            windows, "kvcache_c1_idle", "floor_c1_idle", "in_process_idle"
        ),
        "errors": sum(c["errors"] for c in conditions.values()),
        "kvcache_pods_identity": sum(p["hash_mode"] == "identity" for p in pods),
        "kvcache_pods": len(pods),
        "kvcache_sequence_gaps": _metric(kvcache, "kvcache_sequence_gaps_total"),
        "kvcache_queue_overflow": _metric(kvcache, "kvcache_queue_overflow_total"),
    }
    if "dynamo_c1" not in windows:
        result["dynamo_error"] = "ai-dynamo-runtime (python -m dynamo.indexer) not importable"
    return result


def _overhead(http: list[dict[str, Any]], in_process: list[dict[str, Any]]) -> float | None:
    """Median over repeats of HTTP p50 - in-process p50 (ms): what HTTP adds per score."""
    pairs = list(zip(http, in_process, strict=True))
    if any(h["p50_ms"] is None for h, _ in pairs):
        return None
    return median([h["p50_ms"] - i["p50_ms"] for h, i in pairs])


def _share(
    windows: dict[str, list[dict[str, Any]]], http: str, floor: str, base: str
) -> float | None:
    """Median over repeats of (http p50 - floor p50) / base p50."""
    triples = list(zip(windows[http], windows[floor], windows[base], strict=True))
    if any(None in (h["p50_ms"], f["p50_ms"], b["p50_ms"]) for h, f, b in triples):
        return None
    return median([(h["p50_ms"] - f["p50_ms"]) / b["p50_ms"] for h, f, b in triples])


def main() -> None:
    """Print the results as JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small sizes (harness check)")
    args = parser.parse_args()
    print(json.dumps(run(quick=args.quick), indent=2))


if __name__ == "__main__":
    main()
