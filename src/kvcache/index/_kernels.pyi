"""Type stub of the compiled main-table kernels (src/kvcache/index/_kernels.c)."""

from collections.abc import Callable
from typing import Final

DONE: Final[int]
SPECIAL: Final[int]
NEED_ROOM: Final[int]
NEED_EVICT: Final[int]
FAILED: Final[int]
ROW_BYTES: Final[int]

Transition = Callable[[int], tuple[int, int]]

def add(
    rows: object,
    cap: int,
    seg_mask: int,
    keys: object,
    start: int,
    transition: Transition,
    now: int,
    used: int,
    max_used: int,
    live: int,
    max_live: int,
    /,
) -> tuple[int, int, int, int, int, list[int], BaseException | None]: ...
def remove(
    rows: object,
    cap: int,
    seg_mask: int,
    keys: object,
    start: int,
    transition: Transition,
    /,
) -> tuple[int, int, int, int, int, BaseException | None]: ...
def prefix(
    rows: object,
    cap: int,
    seg_mask: int,
    keys: object,
    id_mask: int,
    now: int,
    /,
) -> tuple[bytes, int]: ...
