"""Event helpers for tests: the decoder's documented merge of removal runs, written apart from it.

The compiled decode fast path folds consecutive `BlockRemoved` events of equal medium, group,
locality and ownership into one (`EventBatch.merged` counts the folded events). Tests compare it
with the msgspec paths through this independent implementation of that rule.
"""

from __future__ import annotations

from kvcache.events.schema import BlockRemoved, Event

__all__ = ["merge_removals"]


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
