"""Argument validation shared by every index backend: block keys and entry lists."""

from __future__ import annotations

import array
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn

import numpy as np
from numpy.typing import NDArray

from kvcache.blocks import PodEntry
from kvcache.errors import IndexOperationError, InvalidKeyError


def as_keys(values: Sequence[int], field: str) -> NDArray[np.uint64]:
    """Block keys as a u64 array; InvalidKeyError names the first value that is not a u64 int."""
    if isinstance(values, np.ndarray):
        if values.dtype == np.uint64:
            return values.ravel()
        if values.dtype.kind in "iu" and (values.size == 0 or int(values.min()) >= 0):
            return values.ravel().astype(np.uint64)
        _raise_bad_key(values.ravel().tolist(), field)
    if isinstance(values, str | bytes | bytearray | memoryview):
        raise InvalidKeyError(field, values)
    try:
        return np.frombuffer(array.array("Q", values), dtype=np.uint64)
    except (TypeError, OverflowError, ValueError):
        _raise_bad_key(values, field)


def as_key(value: int, field: str) -> int:
    """One block key as a Python int (see `as_keys`)."""
    if isinstance(value, int | np.integer):
        key = int(value)
        if 0 <= key < 1 << 64:
            return key
    raise InvalidKeyError(field, value)


def add_keys(
    engine_keys: Sequence[int] | None, request_keys: Sequence[int]
) -> tuple[NDArray[np.uint64], NDArray[np.uint64] | None]:
    """Validated key arrays of an `Index.add` call (shared by every backend)."""
    r = as_keys(request_keys, "request_keys")
    if r.size == 0:
        raise IndexOperationError("add: no request keys given")
    if engine_keys is None:
        return r, None
    e = as_keys(engine_keys, "engine_keys")
    if e.size == 0:
        raise IndexOperationError("add: engine_keys is empty (pass None for no mapping)")
    return r, e


def _raise_bad_key(values: Any, field: str) -> NoReturn:
    if isinstance(values, Iterable) and not isinstance(values, str | bytes):
        for v in values:
            as_key(v, field)
    raise InvalidKeyError(field, values)


def sized(values: object, n: int) -> bool:
    """``len(values) == n`` for anything, False for objects without a length."""
    try:
        return len(values) == n  # type: ignore[arg-type]
    except TypeError:
        return False


def as_entries(entries: Iterable[PodEntry], op: str) -> tuple[PodEntry, ...]:
    out = tuple(dict.fromkeys(entries))
    if not out:
        raise IndexOperationError(f"{op}: no entries given")
    for e in out:
        if not isinstance(e, PodEntry):
            raise IndexOperationError(f"{op}: {e!r} is not a PodEntry")
    return out
