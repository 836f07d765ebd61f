"""An open-addressing hash table of 64-bit keys held in flat numpy arrays.

The table stores *mixed* keys (``mix(key)``, a bijection of u64) and any number of payload
columns in one record array (a slot's key and payload share a cache line), exposed as per-field
views; it only knows slots, never payload semantics.
Batch operations are vectorised: probing runs in rounds over a window of slots per pending key,
and in-batch conflicts for a free slot are settled by letting every contender write and keeping
whoever the claim column says wrote last.

Layout and invariants:

* Mixed value 0 marks an empty slot and 1 a tombstone. The two keys whose mixed value is 0 or 1
  live in the reserved rows ``cap`` and ``cap + 1``; row ``cap + 2`` (index ``-1``) is a
  permanent all-zero row, so ``column[find(...)]`` reads zeros for missing keys.
* The home slot is ``(hi32(h) * cap) >> 32`` (any capacity, no modulo). Probing is linear but
  wraps inside a segment of ``min(cap, SEGMENT)`` slots, so tombstones can be purged one segment
  at a time with a scratch buffer of one segment, whatever the table size.
* ``used`` (live + tombstones) stays below ``max_load * cap``: an insert that would cross it
  first purges tombstones, or grows the table when it is more than ``grow_load`` full of live
  keys. Growth about doubles: with a ``max_capacity`` the sizes are that maximum halved
  repeatedly (rounded down), so old + new arrays never exceed 1.5 times the final size.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import DTypeLike, NDArray

EMPTY = 0
TOMBSTONE = 1
SEGMENT = 1 << 16
"""Probe sequences wrap inside segments of this many slots (or the whole table when smaller)."""

_MUL = 0x9E3779B97F4A7C15
_XOR = 0x6A09E667F3BCC908
_MASK64 = (1 << 64) - 1
_MUL_INV = pow(_MUL, -1, 1 << 64)
_U32 = np.uint64(32)
_MIN_CAPACITY = 16
_MAX_CAPACITY = 1 << 32
_FEW = 16  # pending keys below which probing loops in Python
_WINDOWS = {w: np.arange(w, dtype=np.intp) for w in (1, 8, 16, 32, 64)}

Slots = NDArray[np.intp]
Keys = NDArray[np.uint64]


def mix(keys: Keys) -> Keys:
    """Bijective mix of u64 keys: consecutive keys land far apart; the two keys that mix to 0
    and 1 (the empty and tombstone markers) are stored in reserved rows."""
    h = keys >> _U32
    h ^= keys
    h *= np.uint64(_MUL)
    h ^= np.uint64(_XOR)
    return h


def mix1(key: int) -> int:
    """`mix` for one Python int."""
    return (((key ^ (key >> 32)) * _MUL) & _MASK64) ^ _XOR


def unmix1(h: int) -> int:
    """Inverse of `mix1` (for tests and debugging)."""
    t = ((h ^ _XOR) * _MUL_INV) & _MASK64
    return t ^ (t >> 32)


def round_capacity(n: int, *, down: bool = False) -> int:
    """A valid slot count near ``n``: a power of two up to SEGMENT, else a multiple of SEGMENT."""
    n = max(n, _MIN_CAPACITY)
    if n <= SEGMENT:
        p = 1 << (n.bit_length() - 1)
        return p if down or p == n else p * 2
    segments = n // SEGMENT if down else -(-n // SEGMENT)
    return min(segments * SEGMENT, _MAX_CAPACITY)


class SlotTable:
    """Open-addressing map from mixed u64 keys to slots; payload columns are fields of the same
    record array (``cols[name]`` views).

    ``claim`` names an integer column (≥ 32 bits) used as scratch while placing a batch; callers
    must write every column of freshly inserted slots. Not thread-safe: the owner locks.
    """

    def __init__(
        self,
        capacity: int,
        columns: Mapping[str, DTypeLike],
        claim: str,
        *,
        max_load: float = 0.75,
        grow_load: float = 0.5,
        max_capacity: int | None = None,
    ) -> None:
        if claim not in columns:
            raise ValueError(f"claim column {claim!r} is not a column")
        self._dtypes = {name: np.dtype(dt) for name, dt in columns.items()}
        self._row_dtype = np.dtype([("key", np.uint64), *self._dtypes.items()])
        self._claim = claim
        self._max_load = max_load
        self._grow_load = grow_load
        self.max_capacity = round_capacity(max_capacity or _MAX_CAPACITY, down=True)
        self._ladder = [self.max_capacity]
        while max_capacity is not None and self._ladder[-1] > _MIN_CAPACITY:
            self._ladder.append(round_capacity(self._ladder[-1] // 2, down=True))
        self._ladder.reverse()
        self.live = 0
        """Live keys, including the two reserved rows when occupied."""
        self.used = 0
        """Live keys plus tombstones in the probed area (reserved rows excluded)."""
        self._special = [False, False]
        self.scan_chunk = 4 * SEGMENT
        """Slots per chunk of `iter_live`; bounds the scratch memory of scans."""
        start = round_capacity(capacity)
        self._alloc(
            min(start, self.max_capacity)
            if max_capacity is None
            else next((c for c in self._ladder if c >= start), self.max_capacity)
        )

    def _alloc(self, cap: int) -> None:
        self.cap = cap
        self._purge_hand = 0
        self._seg_mask = min(cap, SEGMENT) - 1
        self._cap_u64 = np.uint64(cap)
        self._max_used = int(cap * self._max_load)
        # one record per slot: a key and its payload share a cache line, so a batch touching
        # random slots misses the cache once per slot rather than once per column
        self._rows = np.zeros(cap + 3, dtype=self._row_dtype)
        self.keys: Keys = self._rows["key"]
        self.cols: dict[str, NDArray[np.generic]] = {n: self._rows[n] for n in self._dtypes}
        self._views = {w: sliding_window_view(self.keys, w) for w in _WINDOWS if w <= cap}

    @property
    def nbytes(self) -> int:
        return int(self._rows.nbytes)

    @property
    def rows(self) -> NDArray[np.void]:
        """The record array itself (for compiled kernels; reallocated by growth)."""
        return self._rows

    @property
    def seg_mask(self) -> int:
        return self._seg_mask

    @property
    def max_used(self) -> int:
        """`used` may not exceed this; see `make_room`."""
        return self._max_used

    @staticmethod
    def bytes_per_slot(columns: Mapping[str, DTypeLike]) -> int:
        return 8 + sum(np.dtype(dt).itemsize for dt in columns.values())

    @property
    def tombstones(self) -> int:
        return self.used - (self.live - sum(self._special))

    def _home(self, h: Keys) -> Slots:
        return (((h >> _U32) * self._cap_u64) >> _U32).astype(np.intp)

    # ----------------------------------------------------------------------------- lookups

    def find(self, h: Keys) -> Slots:
        """Slot of each mixed key, -1 where absent."""
        return self._locate(h, None)

    def locate(self, h: Keys) -> tuple[Slots, Slots]:
        """(slot or -1, and for absent keys the free slot an insert takes, else -1) per key.

        Valid until the next insert or resize (deletes keep it valid); see `insert`.
        """
        ins = np.empty(h.size, dtype=np.intp)
        ins.fill(-1)
        slots = self._locate(h, ins)
        ins[slots >= 0] = -1
        return slots, ins

    def _locate(self, h: Keys, ins: Slots | None) -> Slots:
        if h.size == 0:
            return np.empty(0, dtype=np.intp)
        if int(h.min()) < 2:
            return self._locate_split(h, ins)
        home = self._home(h)
        got = self.keys[home]
        eq = got == h
        res = np.where(eq, home, -1)
        if ins is not None:
            np.copyto(ins, home, where=got < 2)
        pend = ~eq
        pend &= got != EMPTY
        if np.count_nonzero(pend):
            idx = pend.nonzero()[0]
            if idx.size <= _FEW:
                segm = self._seg_mask
                start = (home[idx] & ~segm) | ((home[idx] + 1) & segm)
                self._probe_few(h[idx], start, res, idx, ins)
            else:
                self._probe(h[idx], home[idx], res, idx, ins)
        return res

    def _probe_few(self, h: Keys, start: Slots, res: Slots, idx: Slots, ins: Slots | None) -> None:
        """`_probe` one key at a time from slot ``start``: cheaper than a vectorised round for
        a handful of keys."""
        keys, segm = self.keys, self._seg_mask
        for row, key, first in zip(idx.tolist(), h.tolist(), start.tolist(), strict=True):
            base = first & ~segm
            i = first
            free = -1 if ins is None else int(ins[row])
            for _ in range(segm):
                k = int(keys[i])
                if k == key:
                    res[row] = i
                    break
                if k < 2 and free < 0:
                    free = i
                if k == EMPTY:
                    break
                i = base | ((i + 1) & segm)
            if ins is not None:
                ins[row] = free

    def _locate_split(self, h: Keys, ins: Slots | None) -> Slots:
        """`_locate` when some keys are the two stored in the reserved rows."""
        res = np.empty(h.size, dtype=np.intp)
        sp = h < 2
        special = self.cap + h[sp].astype(np.intp)
        occupied = np.array(self._special)[h[sp].astype(np.intp)]
        res[sp] = np.where(occupied, special, -1)
        if ins is not None:
            ins[sp] = special
        if np.count_nonzero(sp) < sp.size:
            normal = (~sp).nonzero()[0]
            sub = None if ins is None else np.full(normal.size, -1, dtype=np.intp)
            res[normal] = self._locate(h[normal], sub)
            if ins is not None and sub is not None:
                ins[normal] = sub
        return res

    def _window(self, pos: Slots, base: Slots, step: int) -> tuple[Keys, Slots | None]:
        """Keys of ``step`` slots from each ``pos``; the slot grid too when a window wraps.

        Windows that stay inside their segment are rows of a sliding-window view (one gather,
        no index grid); the rare batch where one wraps pays for the masked grid.
        """
        segm = self._seg_mask
        if step <= segm and not np.count_nonzero((pos & segm) > segm + 1 - step):
            return self._views[step][pos], None
        grid = ((pos[:, None] + _WINDOWS[step]) & segm) | base[:, None]
        return self.keys[grid], grid

    def _probe(self, h: Keys, home: Slots, res: Slots, idx: Slots, ins: Slots | None) -> None:
        """Search keys ``h`` (rows ``idx`` of ``res``) after ``home`` to a match or an empty slot.

        With ``ins``, also record the first free slot (tombstone or empty) of rows that have none.
        """
        segm = self._seg_mask
        base = home & ~segm
        pos = base | ((home + 1) & segm)
        step, probed = 8, 1
        while True:
            kw, grid = self._window(pos, base, step)
            match = kw == h[:, None]
            stop = match | (kw == EMPTY)
            first = stop.argmax(axis=1)
            rows = np.arange(pos.size)
            stopped = stop[rows, first]
            found = stopped & match[rows, first]
            if np.count_nonzero(found):
                fr = found.nonzero()[0]
                res[idx[fr]] = pos[fr] + first[fr] if grid is None else grid[fr, first[fr]]
            if ins is not None:
                free = kw < 2
                ff = free.argmax(axis=1)
                need = free[rows, ff] & (ins[idx] < 0)
                if np.count_nonzero(need):
                    nr = need.nonzero()[0]
                    ins[idx[nr]] = pos[nr] + ff[nr] if grid is None else grid[nr, ff[nr]]
            probed += step
            cont = (~stopped).nonzero()[0]
            if probed > segm or not cont.size:
                return
            idx, base, h = idx[cont], base[cont], h[cont]
            pos = base | ((pos[cont] + step) & segm)
            if cont.size <= _FEW:  # stragglers of a long cluster: finish them one by one
                self._probe_few(h, pos, res, idx, ins)
                return
            step = min(step * 2, 64)

    def find1(self, h: int) -> int:
        """`find` for one mixed key."""
        if h < 2:
            return self.cap + h if self._special[h] else -1
        keys = self.keys
        segm = self._seg_mask
        i = ((h >> 32) * self.cap) >> 32
        base = i & ~segm
        for _ in range(segm + 1):
            k = int(keys[i])
            if k == h:
                return i
            if k == EMPTY:
                return -1
            i = base | ((i + 1) & segm)
        return -1

    # ----------------------------------------------------------------------------- inserts

    def insert(
        self, h: Keys, located: tuple[Slots, Slots] | None = None
    ) -> tuple[Slots, NDArray[np.bool_]]:
        """Slots of the keys, inserting the absent ones; returns (slots, freshly inserted).

        ``located`` may pass a `locate` result that is still valid. Duplicated keys get the same
        slot and are all reported fresh when new.
        """
        slots, ins = self.locate(h) if located is None else (located[0].copy(), located[1])
        fresh = slots < 0
        nfresh = int(np.count_nonzero(fresh))
        if nfresh:
            if self.used + nfresh > self._max_used:
                self.make_room(nfresh)
                slots, ins = self.locate(h)
                fresh = slots < 0
            fi = fresh.nonzero()[0]
            slots[fi] = self._claim_slots(h[fi], ins[fi])
        return slots, fresh

    def insert1(self, h: int, slot: int | None = None) -> tuple[int, bool]:
        """`insert` for one mixed key: (slot, freshly inserted); ``slot`` may pass `find1`'s
        answer if nothing was inserted or resized since."""
        if slot is None:
            slot = self.find1(h)
        if slot >= 0:
            return slot, False
        if h < 2:
            self._special[h] = True
            self.live += 1
            return self.cap + h, True
        if self.used + 1 > self._max_used:
            self.make_room(1)
        keys = self.keys
        segm = self._seg_mask
        i = ((h >> 32) * self.cap) >> 32
        base = i & ~segm
        for _ in range(segm + 1):
            k = int(keys[i])
            if k < 2:
                keys[i] = h
                self.live += 1
                self.used += k == EMPTY
                return i, True
            i = base | ((i + 1) & segm)
        raise RuntimeError("hash table segment is full")  # impossible below max_load

    def _claim_slots(self, h: Keys, target: Slots) -> Slots:
        """Write absent keys into their located free slots; keys that lose a slot to another
        key of the batch move on with `_place`."""
        sp = target >= self.cap
        if np.count_nonzero(sp):
            for v in set(h[sp].tolist()):
                if not self._special[v]:
                    self._special[v] = True
                    self.live += 1
            res = target.copy()
            normal = (~sp).nonzero()[0]
            res[normal] = self._claim_slots(h[normal], target[normal])
            return res
        keys, claim = self.keys, self.cols[self._claim]
        order = np.arange(h.size, dtype=np.intp)
        prev = keys[target]
        keys[target] = h
        claim[target] = order
        won = claim[target] == order
        self.live += int(np.count_nonzero(won))
        self.used += int(np.count_nonzero(prev[won] == EMPTY))
        # a loser whose slot now holds its own key lost to a duplicate of itself
        lost = ~(won | (keys[target] == h))
        if not np.count_nonzero(lost):
            return target
        res = target.copy()
        li = lost.nonzero()[0]
        if li.size <= 32:  # usually a handful: a Python loop beats another vectorised round
            res[li] = self._place_few(h[li].tolist(), (target[li] + 1).tolist())
        else:
            res[li] = self._place(h[li], target[li] + 1)
        return res

    def _place_few(self, hs: list[int], starts: list[int]) -> list[int]:
        """`_place` one key at a time, each from its ``start`` slot."""
        keys, segm = self.keys, self._seg_mask
        placed: dict[int, int] = {}
        out = []
        for h, start in zip(hs, starts, strict=True):
            slot = placed.get(h)
            if slot is None:
                base = (((h >> 32) * self.cap) >> 32) & ~segm
                i = base | (start & segm)
                for _ in range(segm + 1):
                    k = int(keys[i])
                    if k < 2:
                        break
                    i = base | ((i + 1) & segm)
                else:
                    raise RuntimeError("hash table segment is full")  # impossible below max_load
                keys[i] = h
                self.live += 1
                self.used += k == EMPTY
                slot = placed[h] = i
            out.append(slot)
        return out

    def _place(self, h: Keys, start: Slots | None = None) -> Slots:
        """Insert keys known to be absent (duplicates allowed) into the first free slots from
        their home (or ``start``, a slot of the same segment); returns their slots."""
        n = h.size
        res = np.empty(n, dtype=np.intp)
        keys = self.keys
        claim = self.cols[self._claim]
        segm = self._seg_mask
        home = self._home(h)
        base = home & ~segm
        pos = home if start is None else base | (start & segm)
        idx = np.arange(n, dtype=np.intp)
        hh = h
        step, rounds = 1, 0
        while idx.size:
            rounds += 1
            if rounds > n + segm + 8:
                raise RuntimeError("hash table segment is full")  # impossible below max_load
            kw, grid = self._window(pos, base, step)
            free = kw < 2
            first = free.argmax(axis=1)
            rows = np.arange(idx.size)
            ok = free[rows, first]
            if step > segm and np.count_nonzero(ok) < ok.size:
                raise RuntimeError("hash table segment is full")  # impossible below max_load
            settled = np.zeros(idx.size, dtype=np.bool_)
            oi = ok.nonzero()[0]
            if oi.size:
                ti = pos[oi] + first[oi] if grid is None else grid[oi, first[oi]]
                hk = hh[oi]
                pi = idx[oi]
                prev = keys[ti]
                keys[ti] = hk
                claim[ti] = pi
                won = claim[ti] == pi
                # a loser whose slot now holds its own key lost to a duplicate of itself
                done = won | (keys[ti] == hk)
                res[pi[done]] = ti[done]
                settled[oi[done]] = True
                self.live += int(np.count_nonzero(won))
                self.used += int(np.count_nonzero(prev[won] == EMPTY))
            # losers retry after the slot they lost, the others after their window
            nxt = pos + np.where(ok, first + 1, step)
            keep = ~settled
            idx, base, hh = idx[keep], base[keep], hh[keep]
            pos = base | (nxt[keep] & segm)
            step = min(step * 8, 64)
        return res

    # ----------------------------------------------------------------------------- deletes

    def delete(self, slots: Slots) -> None:
        """Delete the keys at these distinct, live slots (their payload becomes garbage)."""
        normal = slots[slots < self.cap]
        self.keys[normal] = TOMBSTONE
        self.live -= normal.size
        for s in slots[slots >= self.cap].tolist():
            self._special[s - self.cap] = False
            self.live -= 1

    def delete1(self, slot: int) -> None:
        if slot >= self.cap:
            self._special[slot - self.cap] = False
        else:
            self.keys[slot] = TOMBSTONE
        self.live -= 1

    def clear(self) -> None:
        """Drop every key; keeps the capacity."""
        self.keys[:] = EMPTY
        self._special = [False, False]
        self.live = self.used = 0

    # ----------------------------------------------------------------------------- scans

    def iter_live(self) -> Iterator[Slots]:
        """Slots of live keys, in ascending chunks of `scan_chunk` slots (reserved rows last)."""
        keys = self.keys
        chunk = self.scan_chunk
        for lo in range(0, self.cap, chunk):
            sl = (keys[lo : min(lo + chunk, self.cap)] >= 2).nonzero()[0]
            if sl.size:
                yield sl + lo
        special = [self.cap + i for i in (0, 1) if self._special[i]]
        if special:
            yield np.array(special, dtype=np.intp)

    def mixed_keys(self, slots: Slots) -> Keys:
        """The mixed keys stored at these live slots."""
        out = self.keys[slots].copy()
        sp = slots >= self.cap
        out[sp] = (slots[sp] - self.cap).astype(np.uint64)
        return out

    # ----------------------------------------------------------------------------- resizing

    def make_room(self, n: int) -> None:
        """Ensure ``n`` more keys fit below max_load: grow if allowed and needed, else purge."""
        normal_live = self.live - sum(self._special)
        cap = self.cap
        while normal_live + n > cap * self._grow_load and cap < self.max_capacity:
            cap = self._next_capacity(cap)
        if cap > self.cap:
            self._grow(cap)
        else:  # purge until 1/16 of the slots are spare again, not the whole table at once
            self._purge(self._max_used - n - self.cap // 16)
        if self.used + n > self._max_used:
            raise RuntimeError(f"hash table full: {self.live} live keys in {self.cap} slots")

    def _next_capacity(self, cap: int) -> int:
        """The size after ``cap``: double it, or take the next rung of the bounded ladder."""
        if len(self._ladder) == 1:
            return min(round_capacity(2 * cap), self.max_capacity)
        return next(c for c in self._ladder if c > cap)

    def _purge(self, goal: int = 0) -> None:
        """Rewrite segments in place without their tombstones until ``used <= goal``.

        Segments are taken in order from where the last purge stopped: evictions that sweep the
        table in order leave their tombstones just behind, so each purge finds them quickly.
        """
        keys = self.keys
        seg = self._seg_mask + 1
        segments = self.cap // seg
        for _ in range(segments):
            if self.used <= goal:
                return
            lo = self._purge_hand * seg
            self._purge_hand = (self._purge_hand + 1) % segments
            k = keys[lo : lo + seg]
            nonempty = int(np.count_nonzero(k != EMPTY))
            if nonempty == 0:
                continue
            live = (k >= 2).nonzero()[0] + lo
            if live.size == nonempty:
                continue  # no tombstones here
            hs = keys[live]
            payload = {name: col[live] for name, col in self.cols.items()}
            k[:] = EMPTY
            self.used -= nonempty
            self.live -= live.size
            self._fill(hs, payload)

    def _fill(self, h: Keys, payload: Mapping[str, NDArray[np.generic]]) -> None:
        """Insert distinct keys, with their payload, into segments that are otherwise empty.

        Sorted by home, a segment's keys take p_i = max(home_i, p_{i-1} + 1): a running maximum,
        restarted at every segment. Keys pushed past their segment's end wrap around through
        `_place_few` / `_place`, like any probe would.
        """
        n = h.size
        if not n:
            return
        home = self._home(h)
        order = np.argsort(home, kind="stable")
        h, home = h[order], home[order]
        seg = self._seg_mask + 1
        group = home // seg
        starts = (np.diff(group, prepend=-1) != 0).nonzero()[0]
        lengths = np.diff(np.append(starts, n))
        rank = np.repeat(np.arange(starts.size), lengths)
        local = np.arange(n) - np.repeat(starts, lengths)
        lift = rank * (self.cap + seg)  # makes every segment's running maximum start afresh
        pos = local + np.maximum.accumulate(home - local + lift) - lift
        inside = pos < (group + 1) * seg
        placed = pos[inside]
        self.keys[placed] = h[inside]
        for name, col in self.cols.items():
            col[placed] = payload[name][order[inside]]
        self.live += placed.size
        self.used += placed.size
        if placed.size < n:
            over = (~inside).nonzero()[0]
            if over.size <= _FEW:
                slots = np.array(self._place_few(h[over].tolist(), home[over].tolist()))
            else:
                slots = self._place(h[over])
            for name, col in self.cols.items():
                col[slots] = payload[name][order[over]]

    def _grow(self, cap: int) -> None:
        """Reallocate with ``cap`` slots and reinsert every live key (old arrays freed after).

        Old segments are read in order; a key stored in old segment i has its old home there,
        so its new home is at least the new image of that segment's start. New segments below
        the image of the next old segment can therefore be filled as soon as it is read.
        """
        old_cap, old_keys, old_cols = self.cap, self.keys, self.cols
        special = self._special
        self._alloc(cap)
        self.live = self.used = 0
        seg, old_seg = self._seg_mask + 1, min(old_cap, SEGMENT)
        held_h: list[Keys] = []
        held: dict[str, list[NDArray[np.generic]]] = {name: [] for name in self.cols}
        for lo in range(0, old_cap, old_seg):
            live = (old_keys[lo : lo + old_seg] >= 2).nonzero()[0] + lo
            held_h.append(old_keys[live])
            for name, parts in held.items():
                parts.append(old_cols[name][live])
            nxt = lo + old_seg
            if nxt < old_cap:
                # smallest hi32 whose old home is >= nxt, mapped to its new home's segment
                ready_below = ((-(-(nxt << 32) // old_cap) * cap) >> 32) // seg
            else:
                ready_below = cap // seg
            h = np.concatenate(held_h)
            payload = {name: np.concatenate(parts) for name, parts in held.items()}
            ready = self._home(h) // seg < ready_below
            self._fill(h[ready], {name: v[ready] for name, v in payload.items()})
            wait = ~ready
            held_h = [h[wait]]
            for name, parts in held.items():
                parts[:] = [payload[name][wait]]
        for i in (0, 1):
            if special[i]:
                self.live += 1
                for name, col in self.cols.items():
                    col[cap + i] = old_cols[name][old_cap + i]
        self._special = special
