"""Cluster slot migration: a bucket whose slot is MIGRATING is served through ASK redirects
(ASKING to the importing node), then through MOVED once the slot has moved."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import pytest
from redis_servers import Cluster, cluster, valkey_binary

from kvcache.blocks import KeyType, PodEntry
from kvcache.index.redis import RedisIndex

A, B = PodEntry("pod-a"), PodEntry("pod-b")


@pytest.fixture
def valkey_cluster() -> Iterator[Cluster]:
    binary = valkey_binary()
    if binary is None:
        pytest.fail("no valkey-server binary (install the test extra)")
    with cluster(binary) as nodes:
        yield nodes


def wait_for_healthy(index: RedisIndex, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not index.statistics()["healthy"]:
        assert time.monotonic() < deadline, "index not healthy in time"
        time.sleep(0.02)


def _node_ids(nodes: Cluster) -> list[str]:
    ids = []
    for node in nodes.nodes:
        with contextlib.closing(node.client()) as c:
            ids.append(c.execute_command("CLUSTER", "MYID").decode())
    return ids


def test_ask_redirects_during_a_slot_migration(valkey_cluster: Cluster) -> None:
    ids = _node_ids(valkey_cluster)
    with RedisIndex(valkey_cluster.url, key_prefix="mig", timeout=2.0) as index:
        slot = index._slots[0]  # bucket 0: keys whose low 16 bits are 0 mod 64
        owner = next(
            i
            for i, node in enumerate(valkey_cluster.nodes)
            if index._topology.node(slot).name == f"127.0.0.1:{node.port}"
        )
        target = (owner + 1) % len(ids)
        source_node, target_node = valkey_cluster.nodes[owner], valkey_cluster.nodes[target]
        keys = [64 * i for i in range(1, 9)]  # all in bucket 0
        index.add(None, keys[:4], [A])  # before the migration: on the source
        with (
            contextlib.closing(source_node.client()) as src,
            contextlib.closing(target_node.client()) as dst,
        ):
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[owner])
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
            redirects = index.statistics()["redirects"]
            # single-key commands on keys not on the source are served by the importing node
            # (ASK, then ASKING): a one-key lookup, the engine-key mapping
            assert index.lookup([keys[4]]) == []
            assert not getattr(index.lookup([keys[4]]), "degraded", False)
            assert index.statistics()["redirects"] > redirects
            index.add([64 * 1000], [keys[0]], [A])  # mapping key in bucket 0 too: ASK
            with contextlib.closing(target_node.client()) as c:
                assert c.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 1
            # multi-key scripts on keys split between the nodes get TRYAGAIN: the writes
            # wait in the backlog until the migration is done; other buckets are unaffected
            index.add(None, keys[4:], [B])
            index.evict(keys[5], KeyType.REQUEST, [B])
            index.add(None, [1, 2], [B])  # other buckets: queued behind (order is kept)
            stats = index.statistics()
            assert stats["backlog_ops"] > 0 and not stats["nodes_down"]
            assert index.lookup(keys[:4]) == [frozenset({A})] * 4  # still on the source
            other = [k for k in range(1, 200) if k % 64 and index._slots[k % 64] != slot][:4]
            assert not getattr(index.lookup(other), "degraded", False)
            # finish: move the source's keys, then assign the slot to the target everywhere
            names = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
            src.execute_command(
                "MIGRATE", "127.0.0.1", target_node.port, "", 0, 5000, "KEYS", *names
            )
            for node in valkey_cluster.nodes:
                with contextlib.closing(node.client()) as c:
                    c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target])
        wait_for_healthy(index)
        assert index.lookup(keys) == [frozenset({A})] * 4 + [frozenset({B})]
        assert index.lookup(keys[6:]) == [frozenset({B})] * 2
        assert index.lookup([1, 2]) == [frozenset({B})] * 2
        assert index.request_key(64 * 1000) == keys[0]
        assert index._topology.node(slot).name == f"127.0.0.1:{target_node.port}"  # MOVED
        assert index.clear("pod-b") == 5
        assert index.clear("pod-a") == 4
        assert index.lookup(keys) == []
