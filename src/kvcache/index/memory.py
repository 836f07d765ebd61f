"""The in-process block index: numpy hash tables plus interned entry sets.

Layout (see docs/index-notes.md for the measurements behind it):

* **Main table** (`SlotTable`): mixed request key -> ``set`` (u32) and ``clock`` (u32), 16 bytes
  a slot. ``set`` is the id of an interned ``frozenset[PodEntry]``; its top bit (``_MAPPED``)
  records the identity engine mapping "this key is also an engine key mapped to itself", the
  common case when engines hash blocks the way we do, so it costs no engine-map row. A row with
  set id 0 (empty) exists only while that flag keeps the mapping alive.
* **Entry sets** (`EntrySets`): every distinct entry set gets one id; transitions
  (set, added entries) and (set, removed entries) are memoised, so a batch add maps each run of
  equal ids with one dict lookup. Lookup returns the interned frozensets themselves.
* **Engine table**: mixed engine key -> ``request`` (u64), 16 bytes a slot, for the dual-key
  fallback. A 1:many mapping keeps the last request key in the row and the whole run, packed,
  in a side dict. A mapping is as recent as its request key's row.
* **Recency**: a u32 clock ticks once per operation; adds and lookups stamp the rows they touch.
  Over the key budget, a batch of old rows (``evict_fraction`` of the capacity, at most 65536)
  is evicted by `Recency`: exact below 65536 live rows, else a sampled clock threshold and a
  sweeping hand. An approximate LRU with no per-key list and O(evicted) work per batch.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Collection, Iterable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from kvcache.blocks import KeyType, PodEntry
from kvcache.errors import ConfigError, IndexOperationError, UnknownKeyError
from kvcache.index.entry_sets import ID_MASK, EntrySets
from kvcache.index.keys import add_keys, as_entries, as_key, as_keys, sized
from kvcache.index.recency import Recency
from kvcache.index.table import SlotTable, mix, mix1, round_capacity

try:
    from kvcache.index import _kernels as _native
except ImportError:  # built without a C compiler: the numpy paths serve
    _native = None  # type: ignore[assignment]

KERNELS_AVAILABLE = _native is not None
"""Whether the compiled main-table kernels were built (see `TableIndex`'s ``kernels``)."""

_ID_MASK = ID_MASK
_MAPPED = 0x8000_0000
_ID_BITS = np.uint32(_ID_MASK)  # the same masks for array expressions (keeps them uint32)
_FLAG_BIT = np.uint32(_MAPPED)
_CLOCK_LIMIT = (1 << 32) - 2
_MAX_BATCH = 1 << 16  # keys evicted ahead per batch at most (bounds the pause)

MAIN_COLUMNS = {"set": np.uint32, "clock": np.uint32}
ENGINE_COLUMNS = {"request": np.uint64}

Entries = tuple[PodEntry, ...]
_MULTI_ITEM = 33 + 36 + 40  # bytes header + int key + dict slot of a 1:many run


# --------------------------------------------------------------------------- the index


class TableIndex:
    """The shared engine of `MemoryIndex` and `CostAwareIndex` (see the module docstring).

    Thread-safe: one lock serialises every operation. Operations are short and vectorised, so
    the intended use is one writer per pod shard plus concurrent readers; `clear` and capacity
    evictions scan the table and hold the lock for their duration.
    """

    backend = "table"

    def __init__(
        self,
        main: SlotTable,
        engine: SlotTable,
        *,
        max_keys: int,
        max_engine_keys: int,
        pod_cache_size: int | None,
        evict_fraction: float,
        kernels: bool | None = None,
    ) -> None:
        if pod_cache_size is not None and pod_cache_size < 1:
            raise ConfigError("pod_cache_size", f"must be >= 1 or None, got {pod_cache_size}")
        if not 0.0 <= evict_fraction <= 0.5:
            raise ConfigError("evict_fraction", f"must be in [0, 0.5], got {evict_fraction}")
        if kernels and not KERNELS_AVAILABLE:
            raise ConfigError("kernels", "the compiled kernels were not built in this install")
        self._lock = threading.Lock()
        self._main = main
        # The C kernels know the main table's 16-byte row layout and nothing else.
        layout = main.rows.dtype.fields
        self._kernels = (
            kernels is not False
            and KERNELS_AVAILABLE
            and layout is not None
            and main.rows.dtype.itemsize == _native.ROW_BYTES
            and [layout[n][1] for n in ("key", "set", "clock")] == [0, 8, 12]
        )
        self._engine = engine
        self._main_recency = Recency(main, self._row_clocks, seed=1)
        self._engine_recency = Recency(engine, self._mapping_clocks, seed=2)
        self._sets = EntrySets(pod_cache_size)
        self._multi: dict[int, bytes] = {}
        self._multi_bytes = 0
        self._max_keys = max_keys
        self._max_engine_keys = max_engine_keys
        self._evict_fraction = evict_fraction
        self._now = 1
        self._pairs = 0
        self._identity_used = False
        self._gc_floor = 4096
        self._counters = {
            "adds": 0,
            "admitted_keys": 0,
            "lookups": 0,
            "evicts": 0,
            "clears": 0,
            "evicted_keys": 0,
            "evicted_mappings": 0,
            "set_collections": 0,
        }

    @property
    def kernels(self) -> bool:
        """Whether the compiled kernels serve adds, removals and lookups of the main table."""
        return self._kernels

    @property
    def _set_col(self) -> NDArray[np.uint32]:
        """The main table's set-id column (re-read: growth reallocates the arrays)."""
        return self._main.cols["set"]  # type: ignore[return-value]

    # ------------------------------------------------------------------ protocol

    def add(
        self,
        engine_keys: Sequence[int] | None,
        request_keys: Sequence[int],
        entries: Iterable[PodEntry],
    ) -> list[int]:
        ents = as_entries(entries, "add")
        if sized(request_keys, 1) and (engine_keys is None or sized(engine_keys, 1)):
            return self._add1(engine_keys, request_keys, ents)
        r, e = add_keys(engine_keys, request_keys)
        hr = r if e is None and self._kernels else mix(r)
        with self._lock:
            now = self._tick()
            self._counters["adds"] += 1
            self._counters["admitted_keys"] += r.size
            ents = self._sets.canonical(ents)
            offset = max(0, r.size - self._max_keys)  # only the newest keys can survive anyway
            if e is None and self._kernels:
                positions = self._write_native(r[offset:], ents, now)
                self._maintain()
                return r[offset:][positions].tolist() if positions else []
            slots, again = self._write(hr[offset:], ents, now)
            if e is not None:
                self._map(e, r, slots, offset, now)
            self._maintain()
        if again is None:
            return []
        # a key repeated in the batch is reported once
        return list(dict.fromkeys(r[offset:][again].tolist()))

    def _add1(
        self, engine_keys: Sequence[int] | None, request_keys: Sequence[int], ents: Entries
    ) -> list[int]:
        """`add` of one request key (and at most one engine key) without numpy batches."""
        r = as_key(request_keys[0], "request_keys")
        e = None if engine_keys is None else as_key(engine_keys[0], "engine_keys")
        with self._lock:
            now = self._tick()
            self._counters["adds"] += 1
            self._counters["admitted_keys"] += 1
            slot, again = self._write1(mix1(r), self._sets.canonical(ents), now)
            if e is not None:
                self._map1(e, r, slot, now)
            self._maintain()
        return [r] if again else []

    def lookup(
        self, request_keys: Sequence[int], pods: Collection[str] | None = None
    ) -> list[frozenset[PodEntry]]:
        wanted = None if not pods else pods if isinstance(pods, set | frozenset) else set(pods)
        if sized(request_keys, 1):
            return self._lookup1(as_key(request_keys[0], "request_keys"), wanted)
        r = as_keys(request_keys, "request_keys")
        if r.size == 0:
            return []
        with self._lock:
            ids = self._prefix_ids(r)
            if not ids.size:
                return []
            sets = self._sets.sets
            first = int(ids[0])
            if first == int(ids[-1]) and not np.count_nonzero(ids != first):
                # one entry set for the whole prefix: the common case of a shared prefix
                if wanted is None:
                    return [sets[first]] * ids.size
                return self._filtered([first], wanted) * ids.size
            if wanted is None:
                return [sets[i] for i in ids.tolist()]
            return self._filtered(ids.tolist(), wanted)

    def lookup_runs(
        self, request_keys: Sequence[int], pods: Collection[str] | None = None
    ) -> list[tuple[frozenset[PodEntry], int]]:
        wanted = None if not pods else pods if isinstance(pods, set | frozenset) else set(pods)
        r = as_keys(request_keys, "request_keys")
        if r.size == 0:
            return []
        with self._lock:
            ids = self._prefix_ids(r)
            if not ids.size:
                return []
            # Run boundaries in numpy: the caller never walks the prefix block by block.
            starts = np.flatnonzero(ids[1:] != ids[:-1]) + 1
            bounds = [0, *starts.tolist(), int(ids.size)]
            run_ids = ids[bounds[:-1]].tolist()
            sets = self._sets.sets
            if wanted is None:
                return [(sets[i], bounds[n + 1] - bounds[n]) for n, i in enumerate(run_ids)]
            runs: list[tuple[frozenset[PodEntry], int]] = []
            for n, filtered in enumerate(self._filtered(run_ids, wanted)):
                runs.append((filtered, bounds[n + 1] - bounds[n]))
            return runs

    def _prefix_ids(self, r: NDArray[np.uint64]) -> NDArray[np.uint32]:
        """Set ids of the longest prefix of keys present (lock held); stamps their recency."""
        self._counters["lookups"] += 1
        if self._kernels:
            main = self._main
            now = self._tick()
            found, status = _native.prefix(main.rows, main.cap, main.seg_mask, r, _ID_MASK, now)
            if status == _native.DONE:
                return np.frombuffer(found, dtype=np.uint32)
            # a key of the prefix lives in a reserved row: the numpy path handles those
        slots = self._main.find(mix(r))
        ids = self._set_col[slots]
        if self._identity_used:
            ids &= _ID_BITS
        miss = ids == 0
        if np.count_nonzero(miss):
            cut = int(miss.argmax())
            slots, ids = slots[:cut], ids[:cut]
        if slots.size:
            self._main.cols["clock"][slots] = self._tick()
        return ids

    def _lookup1(self, key: int, wanted: Collection[str] | None) -> list[frozenset[PodEntry]]:
        """`lookup` of a single key without numpy batches."""
        with self._lock:
            self._counters["lookups"] += 1
            slot = self._main.find1(mix1(key))
            sid = int(self._set_col[slot]) & _ID_MASK if slot >= 0 else 0
            if not sid:
                return []
            self._main.cols["clock"][slot] = self._tick()
            if wanted is None:
                return [self._sets.sets[sid]]
            return self._filtered([sid], wanted)

    def evict(self, key: int, key_type: KeyType, entries: Iterable[PodEntry]) -> None:
        ents = frozenset(as_entries(entries, "evict"))
        k = as_key(key, "key")
        with self._lock:
            self._counters["evicts"] += 1
            h = mix1(k)
            if key_type is KeyType.REQUEST:
                self._discard(h, ents)
            elif key_type is KeyType.ENGINE:
                self._evict_engine(h, ents)
            else:  # pragma: no cover - closed enum
                raise IndexOperationError(f"evict: unknown key type {key_type!r}")
            self._maintain()

    def evict_many(
        self, keys: Sequence[int], key_type: KeyType, entries: Iterable[PodEntry]
    ) -> None:
        ents = frozenset(as_entries(entries, "evict"))
        k = as_keys(keys, "keys")
        if not isinstance(key_type, KeyType):
            raise IndexOperationError(f"evict: unknown key type {key_type!r}")
        if not k.size:
            return
        with self._lock:
            self._counters["evicts"] += int(k.size)
            if key_type is KeyType.REQUEST and self._kernels:
                self._discard_native(k, ents)
            elif key_type is KeyType.REQUEST:
                for h in mix(k).tolist():
                    self._discard(h, ents)
            else:
                self._evict_engines(mix(k), ents)
            self._maintain()

    def _discard_native(self, k: NDArray[np.uint64], ents: frozenset[PodEntry]) -> None:
        """`_discard` of every key by the compiled kernel (keys unmixed)."""
        main, sets = self._main, self._sets
        sizes = sets.sizes

        def removed(sid: int) -> tuple[int, int]:
            nid = sets.with_removed(sid, ents)
            return nid, sizes[nid] - sizes[sid]

        pos = 0
        while True:
            stop, status, live_delta, pairs, _, error = _native.remove(
                main.rows, main.cap, main.seg_mask, k, pos, removed
            )
            main.live += live_delta
            self._pairs += pairs
            if status == _native.DONE:
                return
            if status == _native.FAILED:
                assert error is not None
                raise error
            self._discard(mix1(int(k[stop])), ents)  # SPECIAL: a reserved-row key
            pos = stop + 1

    def clear(self, pod: str) -> int:
        with self._lock:
            self._counters["clears"] += 1
            lut = self._sets.without_pod(pod)
            if not lut:
                return 0
            sets = self._sets
            n = len(sets.sets)
            remap = np.arange(n, dtype=np.uint32)
            touched = np.zeros(n, dtype=np.bool_)
            dropped = np.zeros(n, dtype=np.int64)
            for old, new in lut.items():
                remap[old] = new
                touched[old] = True
                dropped[old] = sets.sizes[old] - sets.sizes[new]
            removed = 0
            col = self._set_col
            for chunk in self._main.iter_live():
                v = col[chunk]
                ids = v & _ID_BITS
                hit = touched[ids]
                if not np.count_nonzero(hit):
                    continue
                sl, v, ids = chunk[hit], v[hit], ids[hit]
                removed += int(dropped[ids].sum())
                nid = remap[ids]
                flags = v & _FLAG_BIT
                col[sl] = nid | flags
                dead = (nid == 0) & (flags == 0)
                if np.count_nonzero(dead):
                    self._main.delete(sl[dead])
            self._pairs -= removed
            self._sets.release(lut)  # every row holding these sets was just rewritten
            self._maintain()
            return removed

    def pod_counts(self) -> dict[str, dict[str, int]]:
        """Blocks held per pod and tier: one scan of the table (introspection, not a hot
        path; it holds the lock for about a millisecond per million keys)."""
        with self._lock:
            n = len(self._sets.sets)
            counts = np.zeros(n, dtype=np.int64)
            for chunk in self._main.iter_live():
                counts += np.bincount(self._set_col[chunk] & _ID_BITS, minlength=n)
            sets = list(self._sets.sets)
        out: dict[str, dict[str, int]] = {}
        for sid in counts.nonzero()[0].tolist():
            for e in sets[sid]:
                tiers = out.setdefault(e.pod, {})
                tiers[e.tier] = tiers.get(e.tier, 0) + int(counts[sid])
        return out

    def request_key(self, engine_key: int) -> int:
        k = as_key(engine_key, "engine_key")
        with self._lock:
            h = mix1(k)
            es = self._engine.find1(h)
            if es >= 0:
                return int(self._engine.cols["request"][es])
            ms = self._main.find1(h)
            if ms >= 0 and int(self._set_col[ms]) & _MAPPED:
                return k
        raise UnknownKeyError(f"engine key {k} is not mapped to a request key")

    def statistics(self) -> dict[str, Any]:
        with self._lock:
            return {
                "backend": self.backend,
                "keys": self._main.live,
                "entries": self._pairs,
                "entry_sets": len(self._sets),
                "engine_keys": self._engine.live,
                "max_keys": self._max_keys,
                "max_engine_keys": self._max_engine_keys,
                "capacity": self._max_keys,
                "slots": self._main.cap,
                "engine_slots": self._engine.cap,
                "bytes": self._nbytes(),
                **self._counters,
                "evictions": self._counters["evicted_keys"],
            }

    # ------------------------------------------------------------------ writes

    def _tick(self) -> int:
        self._now += 1
        if self._now >= _CLOCK_LIMIT:
            # halving keeps the order (ties merge); happens once every 2**31 operations
            clock = self._main.cols["clock"]
            np.right_shift(clock, 1, out=clock)
            self._now >>= 1
        return self._now

    def _write1(self, h: int, ents: tuple[PodEntry, ...], now: int) -> tuple[int, bool]:
        """Add ``ents`` to one row; returns its slot and whether they were all there before
        this add call (a row stamped ``now`` was written earlier in the same call)."""
        main = self._main
        slot = main.find1(h)
        if slot < 0 and main.live + 1 > self._max_keys:
            self._evict_keys(main.live + 1 - self._max_keys, now)
        slot, fresh = main.insert1(h, slot)
        col, clock = self._set_col, main.cols["clock"]
        old = 0 if fresh else int(col[slot])
        touched = not fresh and int(clock[slot]) == now
        sid = old & _ID_MASK
        nid = self._sets.with_added(sid, ents)
        col[slot] = nid | (old & _MAPPED)
        clock[slot] = now
        sizes = self._sets.sizes
        self._pairs += sizes[nid] - sizes[sid]
        return slot, not fresh and not touched and nid == sid

    def _write_native(self, r: NDArray[np.uint64], ents: Entries, now: int) -> list[int]:
        """`_write` by the compiled kernel (keys unmixed); returns the positions of the keys
        that already held every entry. The kernel stops for what only Python does."""
        main, sets = self._main, self._sets
        sizes = sets.sizes

        def added(sid: int) -> tuple[int, int]:
            nid = sets.with_added(sid, ents)
            return nid, sizes[nid] - sizes[sid]

        again: list[int] = []
        pos = 0
        while True:
            stop, status, main.used, main.live, pairs, more, error = _native.add(
                main.rows, main.cap, main.seg_mask, r, pos, added, now,
                main.used, main.max_used, main.live, self._max_keys,
            )  # fmt: skip
            self._pairs += pairs
            again += more
            if status == _native.DONE:
                return again
            if status == _native.FAILED:
                assert error is not None
                raise error
            if status == _native.SPECIAL:
                _, held = self._write1(mix1(int(r[stop])), ents, now)
                if held:
                    again.append(stop)
                stop += 1
            else:
                fresh = int(np.count_nonzero(main.find(mix(r[stop:])) < 0))
                if status == _native.NEED_EVICT:
                    # Rows of this batch applied so far carry `now` and are never victims;
                    # the rest are not stamped ahead (the stamp marks "added by this call").
                    self._evict_keys(main.live + fresh - self._max_keys, now)
                else:
                    main.make_room(fresh)
            pos = stop

    def _write(
        self, hr: NDArray[np.uint64], ents: tuple[PodEntry, ...], now: int
    ) -> tuple[NDArray[np.intp], NDArray[np.bool_] | None]:
        """Add ``ents`` to every row; returns the slots and, if any, a mask of the rows that
        already held all of them (vLLM stores a block twice when it recomputes it)."""
        main = self._main
        located = main.locate(hr)
        slots = located[0]
        found = slots >= 0
        nfresh = hr.size - int(np.count_nonzero(found))
        if nfresh and main.live + nfresh > self._max_keys:
            # the batch's own rows are the newest: never victims
            main.cols["clock"][slots[found]] = now
            self._evict_keys(main.live + nfresh - self._max_keys, now)
        slots, fresh = main.insert(hr, located)
        col, clock = self._set_col, main.cols["clock"]
        old = col[slots]
        old[fresh] = 0
        ids = old & _ID_BITS if self._identity_used else old
        new, delta = self._transition(ids, ents)
        col[slots] = new | (old & _FLAG_BIT) if self._identity_used else new
        clock[slots] = now
        if slots.size > 1:
            ordered = np.sort(slots)
            if np.count_nonzero(ordered[1:] == ordered[:-1]):
                delta = self._dedup_delta(slots, ids, new)
        self._pairs += delta
        again = (new == ids) & ~fresh
        return slots, (again if again.any() else None)

    def _transition(
        self, ids: NDArray[np.uint32], ents: tuple[PodEntry, ...]
    ) -> tuple[NDArray[np.uint32], int]:
        """New set ids after adding ``ents`` to each id, and the change in (key, entry) pairs."""
        sets, sizes = self._sets, self._sets.sizes
        first, last = int(ids[0]), int(ids[-1])
        if first == last and int(ids.min()) == int(ids.max()):
            nid = sets.with_added(first, ents)
            return np.full(ids.size, nid, dtype=np.uint32), ids.size * (sizes[nid] - sizes[first])
        # runs of equal ids are the norm (a prefix shared by the same pods): map each run once
        starts = (ids[1:] != ids[:-1]).nonzero()[0] + 1
        starts = np.concatenate(([0], starts))
        lengths = np.diff(np.append(starts, ids.size)).tolist()
        olds = ids[starts].tolist()
        news = [sets.with_added(i, ents) for i in olds]
        delta = sum(
            (sizes[n] - sizes[o]) * ln for o, n, ln in zip(olds, news, lengths, strict=True)
        )
        return np.repeat(np.array(news, dtype=np.uint32), lengths), delta

    def _dedup_delta(
        self, slots: NDArray[np.intp], ids: NDArray[np.uint32], new: NDArray[np.uint32]
    ) -> int:
        _, first = np.unique(slots, return_index=True)
        sizes = self._sets.sizes
        return sum(
            sizes[n] - sizes[o]
            for o, n in zip(ids[first].tolist(), new[first].tolist(), strict=True)
        )

    def _map(
        self,
        e: NDArray[np.uint64],
        r: NDArray[np.uint64],
        rslots: NDArray[np.intp],
        offset: int,
        now: int,
    ) -> None:
        """Record engine -> request keys by the ratio rule; ``rslots[i]`` is row ``r[offset+i]``."""
        m, nr = e.size, r.size
        if m >= nr:
            pos = np.arange(m, dtype=np.intp) if m == nr else (np.arange(m) * nr) // m
            start, end = pos, pos + 1
        else:  # 1:many: engine key j gets request keys [ceil(j*nr/m), ceil((j+1)*nr/m))
            j = np.arange(m + 1, dtype=np.intp)
            bounds = (j * nr + m - 1) // m
            start, end = bounds[:-1], bounds[1:]
        last = end - 1
        kept = last >= offset  # request keys cut by the key budget have no row to map to
        if np.count_nonzero(kept) < kept.size:
            e, start, end, last = e[kept], start[kept], end[kept], last[kept]
            if not e.size:
                return
        target = r[last]
        single = end - start == 1
        ident = single & (e == target)
        col = self._set_col
        if np.count_nonzero(ident):
            self._identity_used = True
            col[rslots[last[ident] - offset]] |= _FLAG_BIT
            if self._engine.live:
                self._unmap_engine(mix(e[ident]))
        other = ~ident
        if not np.count_nonzero(other):
            return
        e, target = e[other], target[other]
        eh = mix(e)
        if self._identity_used:
            self._unmap_identity(eh)
        engine = self._engine
        if engine.live + eh.size > self._max_engine_keys:
            self._evict_mappings(engine.live + eh.size - self._max_engine_keys, now)
        es, _ = engine.insert(eh)
        engine.cols["request"][es] = target
        multi = ~single[other]
        if self._multi:
            for h in eh[~multi].tolist():
                self._unmap_run(h)
        if np.count_nonzero(multi):
            s, t = start[other][multi].tolist(), end[other][multi].tolist()
            for h, a, b in zip(eh[multi].tolist(), s, t, strict=True):
                self._unmap_run(h)
                blob = r[a:b].tobytes()
                self._multi[h] = blob
                self._multi_bytes += len(blob) + _MULTI_ITEM

    def _map1(self, e: int, r: int, rslot: int, now: int) -> None:
        """`_map` for one engine key and one request key (at main-table slot ``rslot``)."""
        eh = mix1(e)
        engine = self._engine
        if e == r:
            self._identity_used = True
            col = self._set_col
            col[rslot] = int(col[rslot]) | _MAPPED
            if engine.live:
                es = engine.find1(eh)
                if es >= 0:
                    engine.delete1(es)
                    self._unmap_run(eh)
            return
        if self._identity_used:
            self._unmap_identity(np.array([eh], dtype=np.uint64))
        es = engine.find1(eh)
        if es < 0 and engine.live + 1 > self._max_engine_keys:
            self._evict_mappings(engine.live + 1 - self._max_engine_keys, now)
            es = engine.find1(eh)
        es, _ = engine.insert1(eh, es)
        engine.cols["request"][es] = r
        if self._multi:
            self._unmap_run(eh)

    def _unmap_engine(self, eh: NDArray[np.uint64]) -> None:
        es = self._engine.find(eh)
        es = np.unique(es[es >= 0])
        if es.size:
            self._engine.delete(es)
            if self._multi:
                for h in eh.tolist():
                    self._unmap_run(h)

    def _unmap_run(self, h: int) -> None:
        blob = self._multi.pop(h, None)
        if blob is not None:
            self._multi_bytes -= len(blob) + _MULTI_ITEM

    def _unmap_identity(self, eh: NDArray[np.uint64]) -> None:
        """Clear the identity flag of rows whose key is now mapped elsewhere."""
        ms = self._main.find(eh)
        ms = ms[ms >= 0]
        if not ms.size:
            return
        v = self._set_col[ms]
        flagged = (v & _FLAG_BIT) != 0
        if not np.count_nonzero(flagged):
            return
        ms, v = ms[flagged], v[flagged] & _ID_BITS
        self._set_col[ms] = v
        dead = np.unique(ms[v == 0])
        if dead.size:
            self._main.delete(dead)

    # ------------------------------------------------------------------ removals

    def _discard(self, h: int, ents: frozenset[PodEntry]) -> None:
        """Remove ``ents`` from the row of mixed key ``h``; an empty row goes unless flagged."""
        slot = self._main.find1(h)
        if slot < 0:
            return
        col = self._set_col
        v = int(col[slot])
        sid = v & _ID_MASK
        nid = self._sets.with_removed(sid, ents)
        if nid == sid:
            return
        sizes = self._sets.sizes
        self._pairs -= sizes[sid] - sizes[nid]
        if nid == 0 and not v & _MAPPED:
            self._main.delete1(slot)
        else:
            col[slot] = nid | (v & _MAPPED)

    def _is_empty(self, h: int) -> bool:
        slot = self._main.find1(h)
        return slot < 0 or not int(self._set_col[slot]) & _ID_MASK

    def _evict_engines(self, hs: NDArray[np.uint64], ents: frozenset[PodEntry]) -> None:
        """`_evict_engine` of every mixed key; mappings to one request key in bulk.

        Every key removes the same entries, so the order does not matter: a request row a
        later key empties is already empty after the first key that names it."""
        engine = self._engine
        es = engine.find(hs)
        bulk = es >= 0
        hl = hs.tolist()
        if self._multi:  # a run of request keys per engine key: key by key
            bulk &= np.fromiter((h in self._multi for h in hl), np.bool_, len(hl)) == 0
        for h in hs[~bulk].tolist():  # also identity-flagged rows and unknown keys
            self._evict_engine(h, ents)
        slots = es[bulk]
        if not slots.size:
            return
        targets: NDArray[np.uint64] = engine.cols["request"][slots]  # type: ignore[assignment]
        if self._kernels:
            self._discard_native(targets, ents)
        else:
            for th in mix(targets).tolist():
                self._discard(th, ents)
        rows = self._main.find(mix(targets))
        held = self._set_col[np.maximum(rows, 0)] & _ID_BITS
        empty = (rows < 0) | (held == 0)
        if np.count_nonzero(empty):
            engine.delete(np.unique(slots[empty]))

    def _evict_engine(self, h: int, ents: frozenset[PodEntry]) -> None:
        engine = self._engine
        es = engine.find1(h)
        if es >= 0:
            blob = self._multi.get(h)
            if blob is None:
                targets = [int(engine.cols["request"][es])]
            else:
                targets = np.frombuffer(blob, dtype=np.uint64).tolist()
            hs = [mix1(t) for t in targets]
            for th in hs:
                self._discard(th, ents)
            if all(self._is_empty(th) for th in hs):
                engine.delete1(es)
                self._unmap_run(h)
            return
        slot = self._main.find1(h)
        if slot >= 0 and int(self._set_col[slot]) & _MAPPED:
            self._discard(h, ents)
            slot = self._main.find1(h)
            if slot >= 0 and not int(self._set_col[slot]) & _ID_MASK:
                self._main.delete1(slot)  # its only request key is itself: the mapping goes too

    # ------------------------------------------------------------------ bounds

    def _evict_keys(self, need: int, now: int) -> None:
        """Evict at least ``need`` old keys (plus a batch), never rows stamped ``now``."""
        main = self._main
        batch = min(int(self._max_keys * self._evict_fraction), _MAX_BATCH)
        victims = self._main_recency.oldest(min(need + batch, main.live), now)
        if not victims.size:
            return
        ids = self._set_col[victims] & _ID_BITS
        sizes = np.asarray(self._sets.sizes, dtype=np.int64)
        self._pairs -= int(sizes[ids].sum())
        main.delete(victims)
        self._counters["evicted_keys"] += victims.size

    def _evict_mappings(self, need: int, now: int) -> None:
        """Evict old engine mappings: those whose request key is gone or least recently used."""
        engine = self._engine
        batch = min(int(self._max_engine_keys * self._evict_fraction), _MAX_BATCH)
        victims = self._engine_recency.oldest(min(need + batch, engine.live), now)
        if not victims.size:
            return
        if self._multi:
            for h in engine.mixed_keys(victims).tolist():
                self._unmap_run(h)
        engine.delete(victims)
        self._counters["evicted_mappings"] += victims.size

    def _row_clocks(self, slots: NDArray[np.intp]) -> NDArray[np.uint32]:
        return self._main.cols["clock"][slots]  # type: ignore[return-value]

    def _mapping_clocks(self, slots: NDArray[np.intp]) -> NDArray[np.uint32]:
        """A mapping is as recent as its request key's row; 0 when that row is gone."""
        targets: NDArray[np.uint64] = self._engine.cols["request"][slots]  # type: ignore[assignment]
        return self._row_clocks(self._main.find(mix(targets)))

    def _maintain(self) -> None:
        """Garbage-collect unused entry sets once as many were created as the last run left."""
        sets = self._sets
        if sets.created > max(self._gc_floor, sets.after_collect):
            self._collect_sets()

    def _collect_sets(self) -> None:
        in_use = np.zeros(len(self._sets.sets), dtype=np.bool_)
        in_use[0] = True
        for chunk in self._main.iter_live():
            in_use[self._set_col[chunk] & _ID_BITS] = True
        self._sets.collect(in_use)
        self._counters["set_collections"] += 1

    def _nbytes(self) -> int:
        tables = self._main.nbytes + self._engine.nbytes
        return tables + self._sets.nbytes + self._multi_bytes + sys.getsizeof(self._multi)

    def _filtered(self, ids: list[int], wanted: Collection[str]) -> list[frozenset[PodEntry]]:
        """Entry sets restricted to ``wanted`` pods, stopping at the first empty one."""
        sets = self._sets
        cache: dict[int, frozenset[PodEntry]] = {}
        out = []
        for i in ids:
            fs = cache.get(i)
            if fs is None:
                full = sets.sets[i]
                fs = frozenset(e for e in full if e.pod in wanted)
                if len(fs) == len(full):
                    fs = full
                else:
                    interned = sets.ids.get(fs)
                    fs = sets.sets[interned] if interned is not None else fs
                cache[i] = fs
            if not fs:
                break
            out.append(fs)
        return out


class MemoryIndex(TableIndex):
    """The default backend: bounded by key count, growing from small.

    ``size`` caps request keys (the approximate-LRU evicts the oldest beyond it), and
    ``pod_cache_size`` caps entries per key (see `EntrySets` for which one is dropped). The
    engine-key map holds at most ``engine_map_size`` rows (default: ``size``).
    """

    backend = "memory"

    def __init__(
        self,
        size: int = 100_000_000,
        pod_cache_size: int | None = 256,
        *,
        engine_map_size: int | None = None,
        evict_fraction: float = 1 / 256,
        initial_slots: int = 1024,
        kernels: bool | None = None,
    ) -> None:
        if size < 1:
            raise ConfigError("size", f"must be >= 1, got {size}")
        engine_size = size if engine_map_size is None else engine_map_size
        if engine_size < 1:
            raise ConfigError("engine_map_size", f"must be >= 1, got {engine_map_size}")
        start = round_capacity(min(initial_slots, 2 * size))
        super().__init__(
            SlotTable(start, MAIN_COLUMNS, "clock"),
            SlotTable(round_capacity(16), ENGINE_COLUMNS, "request"),
            max_keys=size,
            max_engine_keys=engine_size,
            pod_cache_size=pod_cache_size,
            evict_fraction=evict_fraction,
            kernels=kernels,
        )
