"""Token-id validation: ints in [0, 2**32) as a packed array, with the offending value named."""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

from kvcache.errors import (
    ConfigError,
    InvalidTokenError,
)
from kvcache.hashing.model import _U32_LIMIT, TokenIds

# ---------------------------------------------------------------------------------------------
# Token validation
# ---------------------------------------------------------------------------------------------


def _as_u32(tokens: TokenIds) -> array[int]:
    """Validate token ids and return them as a native uint32 ``array`` (no copy if already one)."""
    if isinstance(tokens, array):
        if tokens.typecode == "I":
            return tokens
    elif isinstance(tokens, np.ndarray):
        return _ndarray_as_u32(tokens)
    elif isinstance(tokens, (str, bytes, bytearray, memoryview)):
        # array('I', b"...") would silently reinterpret raw bytes as token ids.
        raise InvalidTokenError(f"token ids must be a sequence of ints, not {type(tokens)}")
    try:
        # array('I') range-checks every element in C: the cheapest full validation available.
        return array("I", tokens)
    except (TypeError, OverflowError, ValueError):
        pass
    _raise_first_bad_token(tokens)
    raise InvalidTokenError("token ids must be ints in [0, 2**32)")  # e.g. a consumed iterator


def _raise_first_bad_token(tokens: Iterable[Any]) -> None:
    try:
        items = enumerate(tokens)
        for index, token in items:
            value = token
            if not isinstance(value, int):
                try:
                    value = token.__index__()
                except (AttributeError, TypeError):
                    raise InvalidTokenError(
                        f"token at index {index} is {type(token).__name__} {token!r}; "
                        "expected an int"
                    ) from None
            if not 0 <= value < _U32_LIMIT:
                raise InvalidTokenError(
                    f"token at index {index} is {value}; token ids must be in [0, 2**32)"
                )
    except TypeError:
        raise InvalidTokenError(f"token ids must be iterable, got {type(tokens)}") from None


def _ndarray_as_u32(tokens: npt.NDArray[Any]) -> array[int]:
    if tokens.ndim != 1:
        raise InvalidTokenError(f"token ids must be 1-D, got an array of shape {tokens.shape}")
    if tokens.dtype.kind not in "iu":
        raise InvalidTokenError(f"token ids must have an integer dtype, got {tokens.dtype}")
    if tokens.size:
        bad = np.flatnonzero((tokens < 0) | (tokens >= _U32_LIMIT))
        if bad.size:
            index = int(bad[0])
            raise InvalidTokenError(
                f"token at index {index} is {int(tokens[index])}; token ids must be in [0, 2**32)"
            )
    out = array("I")
    out.frombytes(tokens.astype(np.uint32, copy=False).tobytes())
    return out


def _check_block_size(block_size: object, field: str = "block_size") -> int:
    if type(block_size) is not int or block_size < 1:
        raise ConfigError(field, f"must be an int >= 1, got {block_size!r}")
    return block_size
