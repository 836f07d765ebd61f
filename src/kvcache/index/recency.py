"""Approximate-LRU victim selection over a `SlotTable` (see docs/index-notes.md)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

from kvcache.index.table import SlotTable

_EXACT_BELOW = 1 << 16  # live rows below which eviction picks the exact oldest
_SAMPLE = 8192  # slots sampled to estimate the clock threshold of a sweep
_OLDEST_SHARE = 1 / 32  # a sweep evicts rows among about this share of the oldest


class Recency:
    """Approximate-LRU victim selection over one table.

    Small tables get the exact oldest rows. Large ones estimate a clock threshold from a random
    sample (the ``q``-quantile, q ~ 2k/live clamped to [1/32, 1/2]) and sweep a hand over the
    slots from where the last sweep stopped, taking live rows at or below it: cost proportional
    to the rows evicted, no per-key list, and victims drawn from the oldest few percent.
    """

    def __init__(
        self, table: SlotTable, clocks: Callable[[NDArray[np.intp]], NDArray[np.uint32]], seed: int
    ) -> None:
        self.table = table
        self.clocks = clocks
        self.hand = 0
        self.rng = np.random.default_rng(seed)

    def oldest(self, k: int, now: int) -> NDArray[np.intp]:
        """About the ``k`` least recent live slots, never one whose clock is ``now``."""
        table = self.table
        if k <= 0 or not table.live:
            return np.empty(0, dtype=np.intp)
        if table.live <= _EXACT_BELOW or 4 * k >= table.live:
            return self._exact(k, now)
        q = min(0.5, max(_OLDEST_SHARE, 2 * k / table.live))
        # sweep in steps sized to find k victims at density q (whole chunks would overshoot)
        step = int(np.clip(2 * k * table.cap / (q * table.live), 4096, table.scan_chunk))
        got = self._sweep(k, self._threshold(q, now), now, step)
        if got.size < k:  # the sample underestimated: widen, then take anything not current
            got = self._sweep(k, self._threshold(min(1.0, 4 * q), now), now, step)
        if got.size < k:
            got = self._sweep(k, now - 1, now, step)
        return got

    def _exact(self, k: int, now: int) -> NDArray[np.intp]:
        slots: NDArray[np.intp] = np.concatenate(list(self.table.iter_live()))
        c = self.clocks(slots).astype(np.int64)
        slots = slots[c != now]
        c = c[c != now]
        if k < slots.size:
            slots = slots[np.argpartition(c, k - 1)[:k]]
        return slots

    def _threshold(self, q: float, now: int) -> int:
        table = self.table
        idx = self.rng.integers(0, table.cap, size=min(table.cap, _SAMPLE))
        idx = idx[table.keys[idx] >= 2]
        c = self.clocks(idx)
        c = c[c != now]
        if c.size < 64:
            return now - 1
        j = int(q * (c.size - 1))
        return int(np.partition(c, j)[j])

    def _sweep(self, k: int, threshold: int, now: int, chunk: int) -> NDArray[np.intp]:
        table = self.table
        cap = table.cap
        pos = self.hand if self.hand < cap else 0
        out: list[NDArray[np.intp]] = []
        n = scanned = 0
        while scanned < cap and n < k:
            hi = min(pos + chunk, cap)
            live = (table.keys[pos:hi] >= 2).nonzero()[0] + pos
            scanned += hi - pos
            pos = hi % cap
            if not live.size:
                continue
            c = self.clocks(live)
            picked = live[(c <= threshold) & (c != now)][: k - n]
            if picked.size:
                out.append(picked)
                n += picked.size
                if n >= k:
                    pos = int(picked[-1]) + 1
        self.hand = pos
        return np.concatenate(out) if out else np.empty(0, dtype=np.intp)
