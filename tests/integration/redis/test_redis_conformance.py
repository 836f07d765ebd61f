"""The shared conformance suite against real servers: Redis 6.2, Valkey, a 3-node Valkey cluster.

One server (or cluster) per module; each test gets a fresh key prefix, so tests never see each
other's keys and need no FLUSHALL.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from redis_servers import Cluster, ServerProcess, cluster, redis_binary, standalone, valkey_binary

from kvcache.index import Index
from kvcache.index.redis import RedisIndex
from kvcache.testing.conformance import IndexConformance

_prefixes = itertools.count()


def _binary(found: str | None, what: str) -> str:
    if found is None:
        pytest.fail(f"no {what} binary (install the test extra)")
    return found


@pytest.fixture(scope="module")
def valkey() -> Iterator[ServerProcess]:
    with standalone(_binary(valkey_binary(), "valkey-server")) as server:
        yield server


@pytest.fixture(scope="module")
def redis_server() -> Iterator[ServerProcess]:
    with standalone(_binary(redis_binary(), "redis-server")) as server:
        yield server


@pytest.fixture(scope="module")
def valkey_cluster() -> Iterator[Cluster]:
    with cluster(_binary(valkey_binary(), "valkey-server")) as nodes:
        yield nodes


def _fresh(url: str) -> Iterator[RedisIndex]:
    index = RedisIndex(url, key_prefix=f"t{next(_prefixes)}", timeout=2.0)
    try:
        yield index
    finally:
        index.close()


class TestValkeyConformance(IndexConformance):
    @pytest.fixture
    def index(self, valkey: ServerProcess) -> Iterator[Index]:
        yield from _fresh(valkey.url.replace("redis://", "valkey://"))


class TestRedisConformance(IndexConformance):
    @pytest.fixture
    def index(self, redis_server: ServerProcess) -> Iterator[Index]:
        yield from _fresh(redis_server.url)


class TestValkeyClusterConformance(IndexConformance):
    @pytest.fixture
    def index(self, valkey_cluster: Cluster) -> Iterator[Index]:
        yield from _fresh(valkey_cluster.url)
