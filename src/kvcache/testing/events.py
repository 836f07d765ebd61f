"""Event helpers for tests: the decoder's documented merges, written apart from it.

The compiled decode fast path folds consecutive `BlockRemoved` events of equal medium, group,
locality and ownership into one (`EventBatch.merged` counts the folded events). Tests compare it
with the msgspec paths through this independent implementation of that rule.
"""

from __future__ import annotations

from kvcache.events.schema import (
    CLEAR,
    REMOVE_RUN,
    STORE_RUN,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Event,
)

__all__ = ["identity_runs", "join_runs", "merge_removals"]


def merge_removals(events: list[Event]) -> tuple[list[Event], int]:
    """Consecutive removals of equal (medium, group, locality, ownership) as one, and how many
    events were folded (written apart from the decoder, for the expected side)."""
    out: list[Event] = []
    folded = 0
    for event in events:
        last = out[-1] if out else None
        if (
            isinstance(event, BlockRemoved)
            and isinstance(last, BlockRemoved)
            and (event.medium, event.group_idx, event.locality, event.ownership)
            == (last.medium, last.group_idx, last.locality, last.ownership)
        ):
            out[-1] = BlockRemoved(
                last.block_hashes + event.block_hashes,
                last.medium,
                last.group_idx,
                last.locality,
                last.ownership,
            )
            folded += 1
        else:
            out.append(event)
    return out, folded


def identity_runs(events: list[Event]) -> list[tuple[int, str | None, int | None, list[int]]]:
    """What an identity-mode applier does with a batch, in order, as ``(kind, medium, group,
    keys)`` runs (`STORE_RUN`, `REMOVE_RUN`, `CLEAR`): events without hashes dropped, then
    consecutive runs of one kind, medium and group joined. Written apart from the decoder's
    `scan_runs`, whose runs tests normalise with `join_runs` before comparing."""
    runs: list[tuple[int, str | None, int | None, list[int]]] = []
    for event in events:
        if isinstance(event, AllBlocksCleared):
            runs.append((CLEAR, None, None, []))
        elif event.block_hashes:
            kind = STORE_RUN if isinstance(event, BlockStored) else REMOVE_RUN
            runs.append((kind, event.medium, event.group_idx, list(event.block_hashes)))
    return join_runs(runs)


def join_runs(
    runs: list[tuple[int, str | None, int | None, list[int]]],
) -> list[tuple[int, str | None, int | None, list[int]]]:
    """Consecutive store (or removal) runs of one medium and group as one."""
    out: list[tuple[int, str | None, int | None, list[int]]] = []
    for kind, medium, group, keys in runs:
        if kind != CLEAR and out and out[-1][:3] == (kind, medium, group):
            out[-1] = (kind, medium, group, out[-1][3] + keys)
        else:
            out.append((kind, medium, group, list(keys)))
    return out
