"""Redis/Valkey wire and topology for `kvcache.index.redis`: RESP packing of the hot
commands (built in numpy, not by redis-py's packer), the nodes and their pools, which node
serves which slot, and the errors that mean "a node is unavailable"."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import redis
from numpy.typing import NDArray
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError
from redis.retry import Retry

from kvcache.index import redis_scripts as scripts

SLOTS = 16384
UNAVAILABLE_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)
NODE_DOWN_ERRORS = (redis.exceptions.ClusterDownError, redis.exceptions.BusyLoadingError)


# --------------------------------------------------------------------------- RESP packing


def resp_bulk(arg: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(arg), arg)


def resp_command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(resp_bulk(a) for a in args)


def pack_keys(base: bytes, keys: NDArray[np.uint64]) -> bytes:
    """The RESP bulk strings ``base + key as 8 big-endian bytes`` for every key, built in numpy
    (redis-py's packer costs ~2 µs an argument; this ~20 ns)."""
    return pack_key_rows(
        np.frombuffer(b"$%d\r\n" % (len(base) + 8) + base, np.uint8), keys
    ).tobytes()


def pack_key_rows(heads: NDArray[np.uint8], keys: NDArray[np.uint64]) -> NDArray[np.uint8]:
    """One row per key: its head (the bulk-string header and key base; one shared row, or one
    row per key), the key as 8 big-endian bytes, CRLF."""
    n, h = keys.size, heads.shape[-1]
    rows = np.empty((n, h + 10), dtype=np.uint8)
    rows[:, :h] = heads
    rows[:, h : h + 8] = keys.astype(">u8").view(np.uint8).reshape(n, 8)
    rows[:, h + 8] = 13
    rows[:, h + 9] = 10
    return rows


def evalsha(name: str, keys: Sequence[bytes], key_block: bytes, nblock: int, *argv: bytes) -> bytes:
    """EVALSHA of a script with ``keys`` then ``nblock`` packed keys (`pack_keys`), then argv."""
    nkeys = len(keys) + nblock
    return (
        b"*%d\r\n" % (3 + nkeys + len(argv))
        + resp_bulk(b"EVALSHA")
        + resp_bulk(scripts.SHA[name])
        + resp_bulk(b"%d" % nkeys)
        + b"".join(resp_bulk(k) for k in keys)
        + key_block
        + b"".join(resp_bulk(a) for a in argv)
    )


# --------------------------------------------------------------------------- nodes and routing


class UnavailableError(Exception):
    """A node did not answer (refused, timed out, reset, cluster down). ``done`` counts the
    queued operations that were fully applied before it happened."""

    done = 0


class Failed:
    """Reply placeholder for a command whose node was unavailable."""


FAILED = Failed()


class Node:
    """One server: a pool for reads (lookup timeout) and one for writes (write timeout)."""

    def __init__(self, name: str, read: redis.ConnectionPool, write: redis.ConnectionPool) -> None:
        self.name = name
        self.read = read
        self.write = write
        self.down = False

    def close(self) -> None:
        self.read.disconnect()
        self.write.disconnect()


class Topology:
    """Which node serves which slot: one node standalone, CLUSTER SLOTS in a cluster."""

    def __init__(self, url: str, timeout: float, write_timeout: float, cluster: bool | None):
        self._timeouts = (timeout, write_timeout)
        common: dict[str, Any] = {"retry": Retry(NoBackoff(), 0), "protocol": 2}
        self._read_seed = redis.ConnectionPool.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, **common
        )
        self._write_seed = redis.ConnectionPool.from_url(
            url, socket_timeout=write_timeout, socket_connect_timeout=write_timeout, **common
        )
        seed = Node(pool_name(self._read_seed), self._read_seed, self._write_seed)
        self.nodes: dict[str, Node] = {seed.name: seed}
        self.seed = seed
        self._slot_nodes: list[Node] = [seed]
        self.lock = threading.Lock()
        if cluster is None:
            info = call_once(seed.write, b"INFO", b"cluster")
            cluster = b"cluster_enabled:1" in info
        self.cluster = cluster
        if cluster:
            self.refresh()

    def node(self, slot: int) -> Node:
        nodes = self._slot_nodes
        return nodes[slot] if len(nodes) > 1 else nodes[0]

    def refresh(self) -> None:
        """Re-read the slot map from the first node that answers (cluster mode)."""
        if not self.cluster:
            return
        last: Exception | None = None
        for node in [self.seed, *self.nodes.values()]:
            try:
                slots = call_once(node.write, b"CLUSTER", b"SLOTS")
                break
            except (*UNAVAILABLE_ERRORS, ResponseError) as exc:
                last = exc
        else:
            raise UnavailableError(f"no cluster node answers CLUSTER SLOTS: {last}")
        table: list[Node | None] = [None] * SLOTS
        with self.lock:
            for start, end, primary, *_ in slots:
                host = primary[0].decode() if isinstance(primary[0], bytes) else str(primary[0])
                node = self._node_at(host or self.seed_host(), int(primary[1]))
                for s in range(int(start), int(end) + 1):
                    table[s] = node
            fallback = next((n for n in table if n is not None), self.seed)
            self._slot_nodes = [n if n is not None else fallback for n in table]

    def seed_host(self) -> str:
        return str(self._read_seed.connection_kwargs.get("host", "127.0.0.1"))

    def _node_at(self, host: str, port: int) -> Node:
        name = f"{host}:{port}"
        node = self.nodes.get(name)
        if node is None:
            pools = []
            for seed, timeout in zip(
                (self._read_seed, self._write_seed), self._timeouts, strict=True
            ):
                kwargs = {**seed.connection_kwargs, "host": host, "port": port}
                kwargs.pop("path", None)
                kwargs.update(socket_timeout=timeout, socket_connect_timeout=timeout)
                pools.append(redis.ConnectionPool(connection_class=seed.connection_class, **kwargs))
            node = self.nodes[name] = Node(name, pools[0], pools[1])
        return node

    def live_nodes(self) -> list[Node]:
        """Nodes that serve at least one slot."""
        return list(dict.fromkeys(self._slot_nodes))

    def close(self) -> None:
        for node in self.nodes.values():
            node.close()


def pool_name(pool: redis.ConnectionPool) -> str:
    kw = pool.connection_kwargs
    return str(kw.get("path") or f"{kw.get('host', '127.0.0.1')}:{kw.get('port', 6379)}")


def call_once(pool: redis.ConnectionPool, *args: bytes) -> Any:
    """One command on a pooled connection (outside the hot paths)."""
    conn: Any = pool.get_connection()
    try:
        conn.send_packed_command([resp_command(*args)], check_health=False)
        return conn.read_response()
    finally:
        pool.release(conn)
