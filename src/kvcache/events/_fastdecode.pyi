"""Type stub of the compiled decoder fast path (src/kvcache/events/_fastdecode.c)."""

from types import EllipsisType

RemovalRun = tuple[list[int], str | None, int | None, str | None, str | None]
"""Consecutive BlockRemoved events folded into one: hashes, medium, group_idx, locality,
ownership."""

Item = RemovalRun | list[int] | EllipsisType | None
"""A removal run; the token ids of the next BlockStored of ``others`` (Ellipsis when they were
skipped); or None for the next AllBlocksCleared of ``others``."""

def scan(
    payload: object, skip_tokens: bool = False, /
) -> tuple[float, int | None, list[Item], int, bytes | None] | None: ...

KeyRun = tuple[int, str | None, int | None, bytes | None, bool]
"""(kind, medium, group_idx, keys as native u64 bytes, whether a stored key repeats); see
`kvcache.events.schema.KeyRun`."""

def scan_runs(
    payload: object, /
) -> tuple[float, int | None, list[KeyRun], int, int, bytes | None] | None: ...
