"""A router's own picks per pod since that pod's last scraped load (in-flight accounting).

Used by `kvcache.routing.Router`, which holds the lock around every call.
"""

from __future__ import annotations

import collections
import math

MAX_INFLIGHT = 65_536
"""Picks remembered per pod between two of its snapshots (a bound for a pod whose scrapes
stopped: beyond it the oldest are forgotten and its queue is underestimated)."""

INFLIGHT_IDLE_S = 300.0
"""A pod with neither a pick nor a snapshot for this long (on the Router's clock) is forgotten
by the in-flight accounting (`Router.expire`): pods that left the fleet do not accumulate."""


class Picks:
    """One pod's picks since its newest snapshot, oldest first, with their predicted tokens.

    The caller holds the Router's lock. With snapshots in time order (the usual case) a load is
    adjusted in O(picks its snapshot retires), not O(picks kept).
    """

    __slots__ = ("picks", "snapshot_at", "tokens", "touched")

    def __init__(self) -> None:
        self.picks: collections.deque[tuple[float, int]] = collections.deque()
        self.tokens = 0  # the picks' predicted uncached tokens, summed
        self.snapshot_at = -math.inf
        self.touched = -math.inf

    def add(self, at: float, tokens: int) -> None:
        if len(self.picks) >= MAX_INFLIGHT:
            self.tokens -= self.picks.popleft()[1]
        self.picks.append((at, tokens))
        self.tokens += tokens
        self.touched = at

    def since(self, scraped_at: float, now: float) -> tuple[int, int]:
        """The picks at or after ``scraped_at`` and their tokens; a newer snapshot first retires
        the picks before it (its numbers show them)."""
        self.touched = now
        picks = self.picks
        if scraped_at > self.snapshot_at:
            self.snapshot_at = scraped_at
            while picks and picks[0][0] < scraped_at:
                self.tokens -= picks.popleft()[1]
            return len(picks), self.tokens
        # An older snapshot than the newest seen (out of order): count from the newest back.
        count = tokens = 0
        for at, predicted in reversed(picks):
            if at < scraped_at:
                break
            count += 1
            tokens += predicted
        return count, tokens
