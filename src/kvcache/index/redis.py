"""The distributed backend: the index in Redis or Valkey, standalone or cluster.

Several routers can share one server: events ingested by one are scored by all. The key layout,
its cluster placement and the failure behaviour are documented in docs/redis.md; in short:

* A block is a STRING ``<prefix>{<tag>}r<key as 8 bytes>`` whose value lists small entry ids
  (``",3,17,"``); the ids are allocated once per `PodEntry` in a shared dictionary hash. A lookup
  is one MGET per bucket, so a 512-key prefix held by 64 pods is one command and ~100 KiB.
* Keys are spread over ``buckets`` hash tags (1 standalone, 64 in a cluster) by the key's low
  bits; every script touches one bucket, so it is atomic on one node, and a lookup or a write is
  one pipelined round trip per node.
* A per-(bucket, entry) reverse SET of block keys makes ``clear(pod)`` proportional to the
  pod's blocks instead of a keyspace SCAN.
* Evictions are queued and applied in pipelined batches by a background flusher (and before
  any other operation of this process, so reads see their own writes).
* Failures never escape to callers: lookups return within ``timeout`` with what they could
  read, as a `Degraded` list; writes queue up in a bounded backlog that is replayed when the
  server is back, and pods whose writes overflowed it are cleared then (resync).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Collection, Iterable, Iterator, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from numpy.typing import NDArray
from redis.crc import key_slot
from redis.exceptions import AskError, MovedError, NoScriptError, ResponseError, TryAgainError

from kvcache.blocks import KeyType, PodEntry
from kvcache.errors import ConfigError, IndexOperationError, UnknownKeyError
from kvcache.index import redis_scripts as scripts
from kvcache.index.keys import add_keys, as_entries, as_key, as_keys
from kvcache.index.redis_backlog import Add, Backlog, Clear, Evict, Op
from kvcache.index.redis_wire import (
    FAILED,
    NODE_DOWN_ERRORS,
    SLOTS,
    UNAVAILABLE_ERRORS,
    Node,
    Topology,
    UnavailableError,
    call_once,
    evalsha,
    pack_key_rows,
    pack_keys,
    resp_command,
)

log = logging.getLogger("kvcache.index.redis")

SCHEMES = {"redis": "redis", "rediss": "rediss", "valkey": "redis", "valkeys": "rediss"}
CLUSTER_BUCKETS = 64
"""Hash tags used in cluster mode: a lookup is at most this many MGETs, spread over nodes."""

_T = TypeVar("_T")


class Degraded(list[_T]):
    """A lookup result cut short because the server (or a cluster node) did not answer in time.

    It holds the prefix that could be read (often empty). Callers that care test
    ``getattr(result, "degraded", False)``; everyone else sees a plain list.
    """

    degraded = True


def normalize_url(url: str) -> str:
    """Accept ``redis://``, ``rediss://``, ``valkey://``, ``valkeys://``, ``unix://`` or
    ``host:port``; return a URL redis-py parses (user, password and db included)."""
    if "://" not in url:
        url = "redis://" + url
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "unix":
        return url
    if scheme not in SCHEMES:
        raise ConfigError(
            "index.redis.url", f"unknown scheme {parts.scheme!r} (use {', '.join(SCHEMES)}, unix)"
        )
    return urlunsplit((SCHEMES[scheme], *parts[1:]))


_LIVE: weakref.WeakSet[RedisIndex] = weakref.WeakSet()


# --------------------------------------------------------------------------- the index


class RedisIndex:
    """`Index` on Redis >= 6.2 or Valkey, standalone or cluster (see the module docstring).

    ``timeout`` bounds a lookup (seconds); ``write_timeout`` a write round trip. ``ttl``
    (seconds, None for none) expires blocks not stored again within it, so entries of pods
    that vanished without an AllBlocksCleared age out. ``backlog_keys`` bounds the keys of
    writes queued while the server is unreachable.
    """

    backend = "redis"

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379",
        *,
        timeout: float = 0.05,
        write_timeout: float = 1.0,
        ttl: float | None = None,
        key_prefix: str = "kvc",
        cluster: bool | None = None,
        buckets: int | None = None,
        backlog_keys: int = 1_000_000,
        retry_interval: float = 0.1,
        linger: float = 0.0005,
        evict_batch: int = 4096,
        clear_chunk: int = 1000,
    ) -> None:
        if timeout <= 0 or write_timeout <= 0:
            raise ConfigError("index.redis.timeout_ms", "timeouts must be > 0")
        if ttl is not None and ttl <= 0:
            raise ConfigError("index.redis.ttl_seconds", f"must be > 0 or None, got {ttl}")
        if "{" in key_prefix or "}" in key_prefix:
            raise ConfigError("index.redis.key_prefix", "must not contain '{' or '}'")
        self.url = normalize_url(url)
        self.timeout = timeout
        self.write_timeout = write_timeout
        self.ttl_ms = b"%d" % round(ttl * 1000) if ttl else b"0"
        self.retry_interval = retry_interval
        self.linger = linger
        self.evict_batch = evict_batch
        self.clear_chunk = b"%d" % clear_chunk
        self.backlog_limit = backlog_keys
        try:
            self._topology = Topology(self.url, timeout, write_timeout, cluster)
        except (*UNAVAILABLE_ERRORS, UnavailableError, ResponseError) as exc:
            raise ConfigError("index.redis.url", f"cannot use {url}: {exc}") from None
        nb = buckets or (CLUSTER_BUCKETS if self._topology.cluster else 1)
        self.buckets = nb
        prefix = key_prefix.encode()
        tags = _spread_tags(nb)
        self._data = [prefix + b"{%b}r" % t for t in tags]
        self._heads = np.array(
            [np.frombuffer(b"$%d\r\n%b" % (len(d) + 8, d), np.uint8) for d in self._data]
        )
        self._maps = [prefix + b"{%b}e" % t for t in tags]
        self._revs = [prefix + b"{%b}p" % t for t in tags]
        self._slots = [key_slot(t) for t in tags]
        self._dict_key = prefix + b":dict"
        self._dict_slot = key_slot(self._dict_key)
        # entry <-> id caches; ids never change while the dictionary's generation is the same
        self._ids: dict[PodEntry, bytes] = {}
        self._entries: dict[bytes, PodEntry] = {}
        self._sets: dict[bytes, frozenset[PodEntry]] = {}
        self._interned: dict[frozenset[PodEntry], frozenset[PodEntry]] = {}
        self._generation: bytes | None = None
        self._write_lock = threading.Lock()
        self._pending_lock = threading.Lock()
        self._pending: list[Op] = []
        self._backlog = Backlog(backlog_keys, self._count)
        self._closed = False
        self._wake = threading.Event()
        self._next_probe = 0.0
        self._next_generation_check = 0.0
        self._counters: dict[str, int] = dict.fromkeys(
            (
                "adds",
                "admitted_keys",
                "lookups",
                "evicts",
                "clears",
                "round_trips",
                "degraded_lookups",
                "degraded_request_keys",
                "backlogged_ops",
                "dropped_ops",
                "resyncs",
                "outages",
                "recoveries",
                "script_loads",
                "redirects",
                "write_errors",
            ),
            0,
        )
        self._stats_lock = threading.Lock()
        try:
            self._check_generation()
        except UnavailableError as exc:
            raise ConfigError("index.redis.url", f"cannot use {url}: {exc}") from None
        self._flusher = threading.Thread(target=self._flush_loop, name="kvcache-redis", daemon=True)
        self._flusher.start()
        _LIVE.add(self)

    # ------------------------------------------------------------------ protocol: writes

    def add(
        self,
        engine_keys: Sequence[int] | None,
        request_keys: Sequence[int],
        entries: Iterable[PodEntry],
    ) -> list[int]:
        ents = as_entries(entries, "add")
        r, e = add_keys(engine_keys, request_keys)
        self._count("adds")
        self._count("admitted_keys", int(r.size))
        result = self._submit(Add(e, r, ents))
        return result if isinstance(result, list) else []

    def evict(self, key: int, key_type: KeyType, entries: Iterable[PodEntry]) -> None:
        ents = as_entries(entries, "evict")
        k = as_key(key, "key")
        if not isinstance(key_type, KeyType):
            raise IndexOperationError(f"evict: unknown key type {key_type!r}")
        self._queue_evictions([Evict(k, key_type, ents)])

    def evict_many(
        self, keys: Sequence[int], key_type: KeyType, entries: Iterable[PodEntry]
    ) -> None:
        ents = as_entries(entries, "evict")
        if not isinstance(key_type, KeyType):
            raise IndexOperationError(f"evict: unknown key type {key_type!r}")
        k = as_keys(keys, "keys").tolist()
        if k:
            self._queue_evictions([Evict(key, key_type, ents) for key in k])

    def _queue_evictions(self, ops: list[Evict]) -> None:
        """Evictions wait in a pending batch, flushed when full or by the background thread."""
        self._count("evicts", len(ops))
        with self._pending_lock:
            self._pending.extend(ops)
            queued = len(self._pending)
        if queued >= self.evict_batch:
            self._flush_pending()
        elif queued == len(ops):
            self._wake.set()

    def clear(self, pod: str) -> int:
        self._count("clears")
        result = self._submit(Clear(pod))
        return result if isinstance(result, int) else 0

    # ------------------------------------------------------------------ protocol: reads

    def lookup(
        self, request_keys: Sequence[int], pods: Collection[str] | None = None
    ) -> list[frozenset[PodEntry]]:
        runs = self.lookup_runs(request_keys, pods)
        out = [fs for fs, n in runs for _ in range(n)]
        return Degraded(out) if getattr(runs, "degraded", False) else out

    def lookup_runs(
        self, request_keys: Sequence[int], pods: Collection[str] | None = None
    ) -> list[tuple[frozenset[PodEntry], int]]:
        wanted = None if not pods else pods if isinstance(pods, set | frozenset) else set(pods)
        r = as_keys(request_keys, "request_keys")
        if r.size == 0:
            return []
        self._count("lookups")
        if self._pending and self._write_lock.acquire(timeout=self.timeout / 2):
            try:  # read our own queued evictions (skipped if a long write holds the lock)
                self._apply_pending_locked()
            finally:
                self._write_lock.release()
        values, complete = self._fetch(r)
        runs = self._runs(values, wanted)
        if complete:
            return runs
        self._count("degraded_lookups")
        return Degraded(runs)

    def request_key(self, engine_key: int) -> int:
        k = as_key(engine_key, "engine_key")
        if self._pending:
            self._flush_pending()
        b = self._bucket1(k)
        [value] = self._run(
            [(self._slots[b], resp_command(b"GET", self._maps[b] + k.to_bytes(8, "big")))], False
        )
        if value is FAILED:
            self._count("degraded_request_keys")
            raise UnknownKeyError(f"engine key {k}: index server unavailable")
        if not isinstance(value, bytes) or len(value) < 16:
            raise UnknownKeyError(f"engine key {k} is not mapped to a request key")
        return int.from_bytes(value[-8:], "big")

    def statistics(self) -> dict[str, Any]:
        with self._stats_lock:
            counters = dict(self._counters)
        down = [n.name for n in self._topology.nodes.values() if n.down]
        return {
            "backend": self.backend,
            "cluster": self._topology.cluster,
            "nodes": len(self._topology.live_nodes()),
            "nodes_down": down,
            "healthy": not down and not self._backlog.waiting,
            "buckets": self.buckets,
            "backlog_ops": len(self._backlog),
            "backlog_keys": self._backlog.keys,
            "pending_evicts": len(self._pending),
            "resync_pods": sorted(self._backlog.resync),
            "entry_ids": len(self._ids),
            **counters,
        }

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Apply queued evictions (best effort), stop the flusher, close the connections."""
        if self._closed:
            return
        self._flush_pending()
        self._closed = True
        self._wake.set()
        if self._flusher is not threading.current_thread():
            self._flusher.join(timeout=5)
        self._topology.close()
        _LIVE.discard(self)

    def __enter__(self) -> RedisIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def server_info(self) -> dict[str, int]:
        """Summed ``used_memory`` and key count over the nodes (blocking; for benchmarks)."""
        memory = keys = 0
        for node in self._topology.live_nodes():
            info = call_once(node.write, b"INFO", b"memory").decode()
            memory += int(info.split("used_memory:")[1].split()[0])
            keys += int(call_once(node.write, b"DBSIZE"))
        return {"used_memory": memory, "keys": keys}

    # ------------------------------------------------------------------ write queue

    def _count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            self._counters[name] += n

    def _submit(self, op: Op) -> Any:
        """Apply queued evictions plus ``op`` now, or queue them behind an outage."""
        with self._write_lock:
            with self._pending_lock:
                ops, self._pending = [*self._pending, op], []
            return self._apply_or_queue(ops)[-1]

    def _flush_pending(self) -> None:
        with self._write_lock:
            self._apply_pending_locked()

    def _apply_pending_locked(self) -> None:
        with self._pending_lock:
            ops, self._pending = self._pending, []
        if ops:
            self._apply_or_queue(ops)

    def _apply_or_queue(self, ops: list[Op]) -> list[Any]:
        """Under the write lock: apply in order, or append to the backlog (which keeps order)."""
        if self._backlog.waiting or self._outage():
            # while a pod awaits its resync clear, every write queues behind it (applied now,
            # it would be wiped by that clear)
            self._backlog.queue(ops)
            return [None] * len(ops)
        try:
            return self._apply(ops)
        except UnavailableError as exc:
            self._backlog.queue(ops[exc.done :])
            return [None] * len(ops)

    def _outage(self) -> bool:
        return any(n.down for n in self._topology.nodes.values())

    def _flush_loop(self) -> None:
        while not self._closed:
            self._wake.wait(self.retry_interval)
            self._wake.clear()
            if self._closed:
                return
            try:
                if self._pending:
                    time.sleep(self.linger)  # let the caller queue the rest of its batch
                    self._flush_pending()
                now = time.monotonic()
                if (self._outage() or self._backlog.waiting) and now >= self._next_probe:
                    self._next_probe = now + self.retry_interval
                    self._recover()
                elif now >= self._next_generation_check:
                    self._next_generation_check = now + 5.0
                    self._check_generation()
            except UnavailableError:
                pass
            except Exception:  # pragma: no cover - never let the flusher die
                log.exception("redis index flusher")

    def _recover(self) -> None:
        """Probe every node; when all answer, clear the pods marked for resync, then replay
        the backlog."""
        topology = self._topology
        topology.refresh()
        for node in topology.live_nodes():
            try:
                call_once(node.read, b"PING")
            except (*UNAVAILABLE_ERRORS, ResponseError):
                node.down = True
                return
        was_down = self._outage()
        for node in topology.nodes.values():
            node.down = False
        self._check_generation()
        # resync clears first: a resync pod's queued writes all follow its gap (see Backlog),
        # and writes keep queueing while any pod awaits its clear, so none lands before it
        for pod in sorted(self._backlog.resync):
            with self._write_lock:
                self._apply([Clear(pod)])
                self._backlog.resync.discard(pod)
            self._count("resyncs")
            log.warning("pod %s resynced: its entries were cleared after an outage", pod)
        while self._backlog:
            # a batch at a time, so writers and lookups get the lock in between; ops leave the
            # backlog once applied, so "healthy" means they are in the server
            with self._write_lock:
                batch = self._backlog.head(256)
                try:
                    self._apply(batch)
                    done = len(batch)
                except UnavailableError as exc:
                    done = exc.done
                self._backlog.applied(done)
                if done < len(batch):
                    return
        if was_down:
            self._count("recoveries")
            log.warning("index server reachable again; backlog replayed")

    def _check_generation(self) -> None:
        """The entry dictionary's generation: a server that lost its data gets a new one, and
        every id cached here is forgotten (ids would be allocated anew)."""
        fresh = os.urandom(8).hex().encode()
        cmds = [
            (self._dict_slot, resp_command(b"HSETNX", self._dict_key, b"g", fresh)),
            (self._dict_slot, resp_command(b"HGET", self._dict_key, b"g")),
        ]
        _, generation = self._run(cmds, True)
        if generation is FAILED or not isinstance(generation, bytes):
            raise UnavailableError("entry dictionary unreachable")
        if generation != self._generation:
            if self._generation is not None:
                log.warning("index server lost its data (new dictionary): caches dropped")
            self._ids.clear()
            self._entries.clear()
            self._sets.clear()
            self._interned.clear()
            self._generation = generation

    # ------------------------------------------------------------------ applying operations

    def _apply(self, ops: list[Op]) -> list[Any]:
        """Apply ``ops`` in order: runs of evictions plus the add after them share round trips;
        a clear is applied on its own. Raises UnavailableError with ``done`` set."""
        results: list[Any] = []
        i = 0
        try:
            while i < len(ops):
                op = ops[i]
                if isinstance(op, Clear):
                    results.append(self._apply_clear(op.pod))
                    i += 1
                    continue
                j = i
                while j < len(ops) and isinstance(ops[j], Evict):
                    j += 1
                evicts: list[Evict] = ops[i:j]  # type: ignore[assignment]
                add = ops[j] if j < len(ops) and isinstance(ops[j], Add) else None
                assert add is None or isinstance(add, Add)
                again = self._apply_batch(evicts, add)
                results.extend([None] * len(evicts))
                if add is not None:
                    results.append(again)
                    j += 1
                i = j
        except UnavailableError as exc:
            exc.done = i
            raise
        return results

    def _apply_batch(self, evicts: list[Evict], add: Add | None) -> list[int]:
        """Evictions then one add: GET mappings (engine evictions only), one pipeline of the
        removal and add scripts and mapping writes, then conditional deletes of mappings."""
        entries = {e for op in evicts for e in op.entries}
        if add is not None:
            entries.update(add.entries)
        ids = self._entry_ids(entries, create=add is not None)
        mappings: list[Any] = []
        engine = [op for op in evicts if op.key_type is KeyType.ENGINE]
        if engine:
            cmds = []
            for op in engine:
                b = self._bucket1(op.key)
                cmds.append(
                    (
                        self._slots[b],
                        resp_command(b"GET", self._maps[b] + op.key.to_bytes(8, "big")),
                    )
                )
            mappings = self._checked(self._run(cmds, True))
        # removals, grouped by (bucket, entry ids); removing commutes, so order inside is free
        groups: dict[tuple[int, tuple[bytes, ...]], list[int]] = {}
        where: list[list[tuple[tuple[int, tuple[bytes, ...]], int]]] = []
        mapping_of: list[tuple[bytes, bytes] | None] = []
        m = 0
        for op in evicts:
            tokens = tuple(sorted(ids[e] for e in op.entries if e in ids))
            targets: list[int] = []
            mapping = None
            if op.key_type is KeyType.REQUEST:
                targets = [op.key]
            else:
                value = mappings[m]
                m += 1
                if isinstance(value, bytes) and len(value) >= 16:
                    b = self._bucket1(op.key)
                    mapping = (self._maps[b] + op.key.to_bytes(8, "big"), value)
                    targets = np.frombuffer(value, dtype=">u8", offset=8).tolist()
            places = []
            for t in dict.fromkeys(targets):
                g = (self._bucket1(t), tokens)
                members = groups.setdefault(g, [])
                places.append((g, len(members)))
                members.append(t)
            where.append(places)
            mapping_of.append(mapping)
        cmds = []
        group_order = list(groups)
        for b, tokens in group_order:
            arr = np.array(groups[(b, tokens)], dtype=np.uint64)
            revs = [self._revs[b] + t for t in tokens]
            block = pack_keys(self._data[b], arr)
            cmds.append(
                (
                    self._slots[b],
                    evalsha("REMOVE", revs, block, arr.size, b"%d" % len(tokens), *tokens),
                )
            )
        add_cmds: list[tuple[NDArray[np.uint64], int]] = []
        if add is not None:
            add_cmds = self._add_commands(add, ids, cmds)
        replies = self._checked(self._run(cmds, True))
        # conditional deletes of engine mappings whose request keys are all empty now
        flags = {g: replies[n][1] for n, g in enumerate(group_order)}
        deletes = []
        for places, mapping in zip(where, mapping_of, strict=True):
            if mapping is None:
                continue
            if all(flags[g][pos : pos + 1] == b"1" for g, pos in places) and places:
                name, value = mapping
                b = self._bucket_of_name(name)
                deletes.append((self._slots[b], evalsha("DELETE_IF", [name], b"", 0, value)))
        if deletes:
            self._checked(self._run(deletes, True))
        if add is None:
            return []
        again: list[int] = []
        for reply, (written, _) in zip(replies[len(group_order) :], add_cmds, strict=False):
            if isinstance(reply, list) and reply:
                again.extend(written[np.array(reply, dtype=np.intp) - 1].tolist())
        return again

    def _add_commands(
        self, add: Add, ids: dict[PodEntry, bytes], cmds: list[tuple[int, bytes]]
    ) -> list[tuple[NDArray[np.uint64], int]]:
        """Append the ADD scripts (one per bucket) then the mapping SETs to ``cmds``; returns
        each script's keys, in command order."""
        tokens = sorted(ids[e] for e in add.entries)
        r = add.request_keys
        unique = r if r.size == 1 else _unique_in_order(r)
        per_bucket: list[tuple[NDArray[np.uint64], int]] = []
        argv = (self.ttl_ms, b"%d" % len(tokens), *tokens)
        for b, keys, block in self._by_bucket(unique):
            revs = [self._revs[b] + t for t in tokens]
            cmds.append((self._slots[b], evalsha("ADD", revs, block, keys.size, *argv)))
            per_bucket.append((keys, b))
        if add.engine_keys is not None:
            self._mapping_commands(add.engine_keys, r, cmds)
        return per_bucket

    def _mapping_commands(
        self, e: NDArray[np.uint64], r: NDArray[np.uint64], cmds: list[tuple[int, bytes]]
    ) -> None:
        """SET engine key -> nonce + request keys, by the ratio rule of the protocol."""
        m, nr = e.size, r.size
        if m >= nr:
            start = np.arange(m, dtype=np.intp) if m == nr else (np.arange(m) * nr) // m
            end = start + 1
        else:  # 1:many: engine key j gets request keys [ceil(j*nr/m), ceil((j+1)*nr/m))
            j = np.arange(m + 1, dtype=np.intp)
            bounds = (j * nr + m - 1) // m
            start, end = bounds[:-1], bounds[1:]
        packed = r.astype(">u8").tobytes()
        nonce = os.urandom(8)  # a later add re-writes the mapping with another nonce
        ttl = (b"PX", self.ttl_ms) if self.ttl_ms != b"0" else ()
        buckets = self._bucket(e).tolist()
        for key, b, s, t in zip(e.tolist(), buckets, start.tolist(), end.tolist(), strict=True):
            value = nonce + packed[8 * s : 8 * t]
            cmds.append(
                (
                    self._slots[b],
                    resp_command(b"SET", self._maps[b] + key.to_bytes(8, "big"), value, *ttl),
                )
            )

    def _apply_clear(self, pod: str) -> int:
        [ids] = self._checked(
            self._run(
                [(self._dict_slot, resp_command(b"HGET", self._dict_key, b"p:" + pod.encode()))],
                True,
            )
        )
        if not isinstance(ids, bytes) or ids == b",":
            return 0
        tokens = ids.strip(b",").split(b",")
        removed = 0
        todo = list(range(self.buckets))
        while todo:
            cmds = []
            for b in todo:
                revs = [self._revs[b] + t for t in tokens]
                cmds.append(
                    (
                        self._slots[b],
                        evalsha("CLEAR", revs, b"", 0, self.clear_chunk, self._data[b], *tokens),
                    )
                )
            replies = self._checked(self._run(cmds, True))
            removed += sum(int(reply[0]) for reply in replies)
            todo = [b for b, reply in zip(todo, replies, strict=True) if int(reply[1])]
        return removed

    def _entry_ids(self, entries: Iterable[PodEntry], *, create: bool) -> dict[PodEntry, bytes]:
        """Entry -> id (decimal bytes), from the cache or the shared dictionary. Without
        ``create`` an entry no one ever added is left out (it is nowhere to remove)."""
        known = self._ids
        entries = list(entries)
        out = {e: known[e] for e in entries if e in known}
        missing = [e for e in entries if e not in known]
        if not missing:
            return out
        encoded = [_encode_entry(e) for e in missing]
        if create:
            cmds = [
                (
                    self._dict_slot,
                    evalsha("ENTRY_ID", [self._dict_key], b"", 0, enc, e.pod.encode()),
                )
                for e, enc in zip(missing, encoded, strict=True)
            ]
        else:
            cmds = [
                (self._dict_slot, resp_command(b"HGET", self._dict_key, b"e:" + enc))
                for enc in encoded
            ]
        for e, reply in zip(missing, self._checked(self._run(cmds, True)), strict=True):
            if isinstance(reply, bytes):
                known[e] = out[e] = reply
                self._entries[reply] = e
        return out

    def _checked(self, replies: list[Any]) -> list[Any]:
        """Write replies, or UnavailableError when a node did not answer or a command failed."""
        for reply in replies:
            if reply is FAILED:
                raise UnavailableError("a node did not answer")
            if isinstance(reply, TryAgainError):
                # a multi-key script on a slot being migrated (keys split between the nodes):
                # queued and retried by the flusher until the migration is done; the nodes
                # are fine, so lookups are not degraded for it
                self._count("write_errors")
                log.info("index write retried later: slot being migrated")
                raise UnavailableError(str(reply))
            if isinstance(reply, ResponseError):
                # e.g. OOM under maxmemory: keep the writes queued and retry them later
                self._count("write_errors")
                log.warning("index write failed: %s", reply)
                for node in self._topology.live_nodes():
                    node.down = True
                raise UnavailableError(str(reply))
        return replies

    # ------------------------------------------------------------------ lookups

    def _fetch(self, r: NDArray[np.uint64]) -> tuple[list[Any], bool]:
        """Values of the keys up to the first missing one; False if a node did not answer."""
        if self.buckets == 1:
            payload = b"*%d\r\n$4\r\nMGET\r\n" % (r.size + 1) + pack_keys(self._data[0], r)
            [values] = self._run([(self._slots[0], payload)], False)
            if not isinstance(values, list):
                return [], False
            return values, True
        buckets = self._bucket(r)
        order = np.argsort(buckets, kind="stable")
        cmds = []
        sizes = []
        for b, keys, block in self._by_bucket(r[order], buckets[order]):
            cmds.append((self._slots[b], b"*%d\r\n$4\r\nMGET\r\n" % (keys.size + 1) + block))
            sizes.append(keys.size)
        flat: list[Any] = []
        for n, reply in zip(sizes, self._run(cmds, False), strict=True):
            flat.extend(reply if isinstance(reply, list) else [FAILED] * n)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        out = [flat[i] for i in inverse.tolist()]
        for i, value in enumerate(out):
            if value is None:
                return out[:i], True
            if value is FAILED:
                return out[:i], False
        return out, True

    def _runs(
        self, values: list[Any], wanted: Collection[str] | None
    ) -> list[tuple[frozenset[PodEntry], int]]:
        runs: list[tuple[frozenset[PodEntry], int]] = []
        prev: bytes | None = None
        current: frozenset[PodEntry] | None = None
        count = 0
        filtered: dict[frozenset[PodEntry], frozenset[PodEntry]] = {}
        for value in values:
            if value is None:
                break
            if value == prev:
                count += 1
                continue
            fs = self._sets.get(value)
            if fs is None:
                fs = self._decode(value)
            if wanted is not None:
                full = fs
                got = filtered.get(full)
                if got is None:
                    got = frozenset(e for e in full if e.pod in wanted)
                    got = full if len(got) == len(full) else self._intern(got)
                    filtered[full] = got
                fs = got
            if not fs:
                break
            prev = value
            if fs is current:
                count += 1
                continue
            if current is not None:
                runs.append((current, count))
            current, count = fs, 1
        if current is not None:
            runs.append((current, count))
        return runs

    def _decode(self, value: bytes) -> frozenset[PodEntry]:
        """A block value's entry set (interned, cached); ids another router allocated are
        fetched from the dictionary."""
        tokens = value.strip(b",").split(b",")
        entries = self._entries
        unknown = [t for t in tokens if t not in entries]
        if unknown:
            cmds = [
                (self._dict_slot, resp_command(b"HGET", self._dict_key, b"i:" + t)) for t in unknown
            ]
            for t, reply in zip(unknown, self._run(cmds, False), strict=True):
                if isinstance(reply, bytes):
                    entry = _decode_entry(reply)
                    entries[t] = entry
                    self._ids.setdefault(entry, t)
        fs = self._intern(frozenset(entries[t] for t in tokens if t in entries))
        if len(self._sets) > 65536:
            self._sets.clear()
        if not unknown or all(t in entries for t in tokens):
            self._sets[value] = fs
        return fs

    def _intern(self, fs: frozenset[PodEntry]) -> frozenset[PodEntry]:
        got = self._interned.get(fs)
        if got is None:
            if len(self._interned) > 65536:
                self._interned.clear()
            got = self._interned[fs] = fs
        return got

    # ------------------------------------------------------------------ routing

    def _bucket(self, keys: NDArray[np.uint64]) -> NDArray[np.intp]:
        return ((keys & np.uint64(0xFFFF)) % np.uint64(self.buckets)).astype(np.intp)

    def _by_bucket(
        self, keys: NDArray[np.uint64], buckets: NDArray[np.intp] | None = None
    ) -> Iterator[tuple[int, NDArray[np.uint64], bytes]]:
        """(bucket, its keys, their packed names) per bucket. Tags have one width, so all the
        names are built in one numpy pass. ``buckets`` given means ``keys`` are sorted by it."""
        if self.buckets == 1:
            yield 0, keys, pack_keys(self._data[0], keys)
            return
        if buckets is None:
            buckets = self._bucket(keys)
            order = np.argsort(buckets, kind="stable")
            keys, buckets = keys[order], buckets[order]
        blob = pack_key_rows(self._heads[buckets], keys).tobytes()
        width = len(blob) // keys.size
        cuts = [0, *(np.flatnonzero(buckets[1:] != buckets[:-1]) + 1).tolist(), keys.size]
        for start, end in itertools.pairwise(cuts):
            yield int(buckets[start]), keys[start:end], blob[start * width : end * width]

    def _bucket1(self, key: int) -> int:
        return (key & 0xFFFF) % self.buckets

    def _bucket_of_name(self, name: bytes) -> int:
        return self._bucket1(int.from_bytes(name[-8:], "big"))

    def _run(self, cmds: list[tuple[int, bytes]], write: bool) -> list[Any]:
        """Send every command to its node, all nodes before reading any reply (one round trip
        per node). Replies come back in order; a ResponseError is returned, not raised; a node
        that fails marks its commands FAILED (and itself down). Redirections (MOVED, ASK,
        TRYAGAIN) and NOSCRIPT are resolved here."""
        replies: list[Any] = [None] * len(cmds)
        todo = list(range(len(cmds)))
        asking: dict[int, Node] = {}
        for attempt in range(4):
            by_node: dict[Node, list[int]] = {}
            for i in todo:
                node = asking.get(i) or self._topology.node(cmds[i][0])
                by_node.setdefault(node, []).append(i)
            self._count("round_trips")
            sent = []
            for node, idxs in by_node.items():
                if node.down and not write:
                    for i in idxs:
                        replies[i] = FAILED
                    continue
                pool = node.write if write else node.read
                payload = [
                    (b"*1\r\n$6\r\nASKING\r\n" if i in asking else b"") + cmds[i][1] for i in idxs
                ]
                try:
                    conn: Any = pool.get_connection()  # connects; releases itself if it fails
                except UNAVAILABLE_ERRORS:
                    self._node_failed(node, idxs, replies)
                    continue
                try:
                    conn.send_packed_command([b"".join(payload)], check_health=False)
                    sent.append((node, pool, conn, idxs))
                except UNAVAILABLE_ERRORS:
                    conn.disconnect()
                    pool.release(conn)
                    self._node_failed(node, idxs, replies)
            for node, pool, conn, idxs in sent:
                try:
                    for i in idxs:
                        if i in asking:
                            with contextlib.suppress(ResponseError):
                                conn.read_response()  # +OK of ASKING
                        try:
                            replies[i] = conn.read_response()
                        except ResponseError as exc:
                            replies[i] = exc
                except UNAVAILABLE_ERRORS:
                    conn.disconnect()
                    self._node_failed(node, idxs, replies)
                finally:
                    pool.release(conn)
            asking = {}
            retry = []
            refresh = False
            for i in todo:
                reply = replies[i]
                if not isinstance(reply, ResponseError):
                    continue
                if isinstance(reply, NoScriptError):
                    self._load_scripts(self._topology.node(cmds[i][0]))
                elif isinstance(reply, MovedError):
                    refresh = True
                    self._count("redirects")
                elif isinstance(reply, AskError):
                    asking[i] = self._topology._node_at(reply.host, reply.port)
                    self._count("redirects")
                elif isinstance(reply, TryAgainError) and attempt < 3:
                    time.sleep(0.005)
                elif isinstance(reply, NODE_DOWN_ERRORS):
                    self._node_failed(self._topology.node(cmds[i][0]), [i], replies)
                    continue
                else:
                    continue
                retry.append(i)
            if refresh:
                try:
                    self._topology.refresh()
                except UnavailableError:
                    break
            if not retry:
                break
            todo = retry
        return replies

    def _node_failed(self, node: Node, idxs: list[int], replies: list[Any]) -> None:
        for i in idxs:
            replies[i] = FAILED
        if not node.down:
            node.down = True
            self._count("outages")
            log.warning("index server %s unavailable: lookups degraded, writes queued", node.name)
        self._wake.set()

    def _load_scripts(self, node: Node) -> None:
        for body in scripts.ALL.values():
            call_once(node.write, b"SCRIPT", b"LOAD", body)
        self._count("script_loads")


# --------------------------------------------------------------------------- helpers


def _spread_tags(n: int) -> list[bytes]:
    """``n`` hash tags whose slots fall in ``n`` equal slot ranges, so buckets spread evenly
    over the nodes of a cluster with the usual contiguous slot ranges (deterministic)."""
    tags: list[bytes] = []
    candidate = 0
    for i in range(n):
        lo, hi = i * SLOTS // n, (i + 1) * SLOTS // n
        while not lo <= key_slot(b"%05d" % candidate) < hi:
            candidate += 1
        tags.append(b"%05d" % candidate)  # one width: every block key has the same length
        candidate = 0
    return tags


def _unique_in_order(keys: NDArray[np.uint64]) -> NDArray[np.uint64]:
    _, first = np.unique(keys, return_index=True)
    if first.size == keys.size:
        return keys
    return keys[np.sort(first)]


def _encode_entry(e: PodEntry) -> bytes:
    return json.dumps([e.pod, e.tier, e.speculative, e.group], separators=(",", ":")).encode()


def _decode_entry(raw: bytes) -> PodEntry:
    pod, tier, speculative, group = json.loads(raw)
    return PodEntry(str(pod), str(tier), bool(speculative), None if group is None else int(group))


def _close_all() -> None:
    for index in list(_LIVE):
        try:
            index.close()
        except Exception:  # pragma: no cover - best effort at exit
            log.debug("closing a redis index at exit", exc_info=True)


atexit.register(_close_all)
