"""Interned entry sets: every distinct ``frozenset[PodEntry]`` of an index behind a small id."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from kvcache.blocks import PodEntry
from kvcache.errors import IndexOperationError

ID_MASK = 0x7FFF_FFFF
"""Set ids fit in 31 bits: the main table keeps a flag in the top bit of its set column."""
_MAX_SET_IDS = ID_MASK
_SET_OVERHEAD = 120  # dict slot + list slots per interned set, on top of the objects' sizes
_MEMO_ITEM = 160  # key tuple + dict slot of a memoised transition


class EntrySets:
    """Interned ``frozenset[PodEntry]`` values behind small integer ids (0 is the empty set).

    With ``limit`` set, a set keeps at most ``limit`` entries: adding one more drops the entry
    that has been in the set longest, by the order in which the interned set was first formed
    (re-adding an entry that is already there does not refresh it).
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        empty: frozenset[PodEntry] = frozenset()
        self.sets: list[frozenset[PodEntry]] = [empty]
        self.orders: list[tuple[PodEntry, ...]] = [()]
        self.sizes: list[int] = [0]
        self.ids: dict[frozenset[PodEntry], int] = {empty: 0}
        self.free: list[int] = []
        self.entries: dict[PodEntry, PodEntry] = {}
        self._added: dict[tuple[int, tuple[PodEntry, ...]], int] = {}
        self._removed: dict[tuple[int, frozenset[PodEntry]], int] = {}
        self.object_bytes = 0
        self.created = 0
        """Sets interned since the last `collect`."""
        self.after_collect = 0
        """Sets left by the last `collect`."""

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        """Estimated bytes of the Python objects held (sets, memo tables, id lists)."""
        memo = (len(self._added) + len(self._removed)) * _MEMO_ITEM
        lists = 3 * 8 * len(self.sets) + sys.getsizeof(self.ids)
        return self.object_bytes + memo + lists + 200 * len(self.entries)

    def canonical(self, entries: tuple[PodEntry, ...]) -> tuple[PodEntry, ...]:
        """The stored object for each entry, so equal entries share one object."""
        table = self.entries
        return tuple(table.setdefault(e, e) for e in entries)

    def with_added(self, sid: int, entries: tuple[PodEntry, ...]) -> int:
        key = (sid, entries)
        nid = self._added.get(key)
        if nid is None:
            cur = self.sets[sid]
            new = tuple(e for e in entries if e not in cur)
            if not new:
                nid = sid
            else:
                order = self.orders[sid] + new
                if self.limit is not None and len(order) > self.limit:
                    order = order[-self.limit :]
                nid = self._intern(order)
            self._memo(self._added, key, nid)
        return nid

    def with_removed(self, sid: int, entries: frozenset[PodEntry]) -> int:
        key = (sid, entries)
        nid = self._removed.get(key)
        if nid is None:
            cur = self.sets[sid]
            nid = (
                sid
                if cur.isdisjoint(entries)
                else self._intern(tuple(e for e in self.orders[sid] if e not in entries))
            )
            self._memo(self._removed, key, nid)
        return nid

    def without_pod(self, pod: str) -> dict[int, int]:
        """{id: id without the pod's entries} for every live set holding an entry of ``pod``."""
        out: dict[int, int] = {}
        for fs, sid in list(self.ids.items()):
            if any(e.pod == pod for e in fs):
                out[sid] = self._intern(tuple(e for e in self.orders[sid] if e.pod != pod))
        return out

    def _memo(self, table: dict[Any, int], key: Any, nid: int) -> None:
        if len(table) > 4 * len(self.ids) + 65536:
            table.clear()  # ids stay valid; only the shortcut is lost
        table[key] = nid

    def _intern(self, order: tuple[PodEntry, ...]) -> int:
        fs = frozenset(order)
        sid = self.ids.get(fs)
        if sid is not None:
            return sid
        if self.free:
            sid = self.free.pop()
            self.sets[sid], self.orders[sid], self.sizes[sid] = fs, order, len(fs)
        else:
            sid = len(self.sets)
            if sid > _MAX_SET_IDS:
                raise IndexOperationError("too many distinct entry sets")
            self.sets.append(fs)
            self.orders.append(order)
            self.sizes.append(len(fs))
        self.ids[fs] = sid
        self.created += 1
        self.object_bytes += sys.getsizeof(fs) + sys.getsizeof(order) + _SET_OVERHEAD
        return sid

    def collect(self, in_use: NDArray[np.bool_]) -> int:
        """Free every set whose id is not ``in_use`` (id 0 stays); returns how many were freed."""
        freed = self.release(
            [sid for sid, fs in enumerate(self.sets) if sid and fs and not in_use[sid]]
        )
        live_entries = {e for fs in self.ids for e in fs}
        self.entries = {e: e for e in self.entries if e in live_entries}
        self.created = 0
        self.after_collect = len(self.ids)
        return freed

    def release(self, ids: Iterable[int]) -> int:
        """Free these ids, known to be unused by any key; returns how many were freed."""
        empty: frozenset[PodEntry] = frozenset()
        freed = 0
        for sid in ids:
            fs = self.sets[sid]
            if not sid or not fs:
                continue
            del self.ids[fs]
            self.object_bytes -= sys.getsizeof(fs) + sys.getsizeof(self.orders[sid]) + _SET_OVERHEAD
            self.sets[sid], self.orders[sid], self.sizes[sid] = empty, (), 0
            self.free.append(sid)
            freed += 1
        if freed:  # the memo tables may name freed ids
            self._added.clear()
            self._removed.clear()
        return freed
