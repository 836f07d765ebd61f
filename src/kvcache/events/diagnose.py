"""Why an event failed typed decoding, in words: the first offending field in wire order.

The typed decoders (msgspec structs, see `kvcache.events.decode`) only say that an event does
not fit. When one refuses an event, it is decoded generically and checked field by field
against the wire structs' types, so the rejection names the field (``bad_token_ids``,
``unknown_type``...) and what was wrong with it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, TypeAlias

import msgspec

from kvcache.events.schema import (
    ALL_BLOCKS_CLEARED_TAG,
    BAD_EVENT,
    BLOCK_REMOVED_TAG,
    BLOCK_STORED_TAG,
    UNKNOWN_TYPE,
)

__all__ = ["DETAIL_LIMIT", "clip", "diagnose"]

DETAIL_LIMIT: Final = 200
"""Longest rejection detail kept (details are logged)."""

# Everything msgspec (or a hostile payload) can throw at a decode call.
_DECODE_ERRORS: Final = (msgspec.MsgspecError, TypeError, ValueError, OverflowError, RecursionError)
_GENERIC: Final = msgspec.msgpack.Decoder()


_Check: TypeAlias = Callable[[Any], "str | None"]


_MSGPACK_NAMES: Final[dict[type, str]] = {
    bool: "bool",
    float: "float",
    str: "str",
    bytes: "bytes",
    list: "array",
    dict: "map",
}


def _kind(value: Any) -> str:
    """Describe a generically decoded value the way msgpack would name it."""
    if value is None:
        return "nil"
    if value.__class__ is int:
        return str(value)
    cls: type = value.__class__
    return _MSGPACK_NAMES.get(cls, cls.__name__)


def _check_hash(value: Any) -> str | None:
    if value.__class__ is int or value.__class__ is bytes:
        return None
    return f"expected an int or bytes hash, got {_kind(value)}"


def _check_optional_hash(value: Any) -> str | None:
    return None if value is None else _check_hash(value)


def _check_uint(value: Any) -> str | None:
    if value.__class__ is int and value >= 0:
        return None
    return f"expected a non-negative int, got {_kind(value)}"


def _check_list_of(item: _Check) -> _Check:
    def check(value: Any) -> str | None:
        if value.__class__ is not list:
            return f"expected an array, got {_kind(value)}"
        for position, element in enumerate(value):
            problem = item(element)
            if problem is not None:
                return f"[{position}] {problem}"
        return None

    return check


def _check_optional(inner: _Check) -> _Check:
    def check(value: Any) -> str | None:
        return None if value is None else inner(value)

    return check


def _check_int(value: Any) -> str | None:
    return None if value.__class__ is int else f"expected an int, got {_kind(value)}"


def _check_str(value: Any) -> str | None:
    return None if value.__class__ is str else f"expected a str, got {_kind(value)}"


def _check_extra_key_entry(value: Any) -> str | None:
    if value is None or value.__class__ is list:
        return None
    return f"expected an array or nil, got {_kind(value)}"


# (field, required, check) in wire order; mirrors the types of the wire structs in schema.py.
_STORED_CHECKS: Final[tuple[tuple[str, bool, _Check], ...]] = (
    ("block_hashes", True, _check_list_of(_check_hash)),
    ("parent_block_hash", True, _check_optional_hash),
    ("token_ids", True, _check_list_of(_check_uint)),
    ("block_size", True, _check_uint),
    ("lora_id", False, _check_optional(_check_int)),
    ("medium", False, _check_optional(_check_str)),
    ("lora_name", False, _check_optional(_check_str)),
    ("extra_keys", False, _check_optional(_check_list_of(_check_extra_key_entry))),
    ("group_idx", False, _check_optional(_check_uint)),
    ("kv_cache_spec_kind", False, _check_optional(_check_str)),
    ("kv_cache_spec_sliding_window", False, _check_optional(_check_int)),
    ("locality", False, _check_optional(_check_str)),
    ("ownership", False, _check_optional(_check_str)),
    ("session_id", False, _check_optional(_check_str)),
    ("lookahead_token_ids", False, _check_optional(_check_list_of(_check_list_of(_check_uint)))),
    ("cache_salt", False, _check_optional(_check_str)),
)
_REMOVED_CHECKS: Final[tuple[tuple[str, bool, _Check], ...]] = (
    ("block_hashes", True, _check_list_of(_check_hash)),
    ("medium", False, _check_optional(_check_str)),
    ("group_idx", False, _check_optional(_check_uint)),
    ("locality", False, _check_optional(_check_str)),
    ("ownership", False, _check_optional(_check_str)),
)
_CHECKS_BY_TAG: Final[dict[str, tuple[tuple[str, bool, _Check], ...]]] = {
    BLOCK_STORED_TAG: _STORED_CHECKS,
    BLOCK_REMOVED_TAG: _REMOVED_CHECKS,
}


def clip(text: str, limit: int = DETAIL_LIMIT) -> str:
    """``text`` cut to ``limit`` characters (an ellipsis marks the cut): safe to log."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def diagnose(raw: msgspec.Raw, error: BaseException) -> tuple[str, str]:
    """Name the reason an event failed typed decoding: the first offending field in wire order.

    Falls back to ``bad_event`` with msgspec's own message when no field check fails (e.g. a
    map with a non-string key).
    """
    fallback = (BAD_EVENT, clip(f"{type(error).__name__}: {error}"))
    try:
        event = _GENERIC.decode(raw)
    except _DECODE_ERRORS:
        return fallback
    tag: Any
    if event.__class__ is list:
        if not event or event[0].__class__ is not str:
            return BAD_EVENT, "array event without a string tag at index 0"
        tag = event[0]
    elif event.__class__ is dict:
        tag = event.get("type")
        if tag.__class__ is not str:
            return BAD_EVENT, 'map event without a string "type"'
    else:
        return BAD_EVENT, f"event is {_kind(event)}, not an array or map"
    if tag == ALL_BLOCKS_CLEARED_TAG:
        return fallback
    checks = _CHECKS_BY_TAG.get(tag)
    if checks is None:
        return UNKNOWN_TYPE, clip(f"unknown event type {tag!r}")
    for position, (name, required, check) in enumerate(checks, start=1):
        if event.__class__ is list:
            present = position < len(event)
            value = event[position] if present else None
        else:
            present = name in event
            value = event.get(name)
        problem = check(value) if present else ("missing" if required else None)
        if problem is not None:
            return f"bad_{name}", clip(f"{name}: {problem}")
    return fallback
