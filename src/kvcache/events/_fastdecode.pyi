"""Type stub of the compiled decoder fast path (src/kvcache/events/_fastdecode.c)."""

RemovalRun = tuple[list[int], str | None, int | None, str | None, str | None]
"""Consecutive BlockRemoved events folded into one: hashes, medium, group_idx, locality,
ownership."""

Item = RemovalRun | list[int] | None
"""A removal run; the token ids of the next BlockStored of ``others``; or None for the next
AllBlocksCleared of ``others``."""

def scan(payload: object, /) -> tuple[float, int | None, list[Item], int, bytes | None] | None: ...
