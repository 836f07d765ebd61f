"""Value types of the key schemes: algorithms, extra-key eras, request extras, the protocol."""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final, Protocol, TypeAlias, runtime_checkable

import numpy as np
import numpy.typing as npt

from kvcache.errors import (
    ExtraKeysError,
    HashingError,
)

TokenIds: TypeAlias = "Sequence[int] | npt.NDArray[np.integer[Any]] | array[int]"
"""What the schemes accept as token ids: any int sequence, an integer ndarray or array('I')."""

_U64_MASK: Final = (1 << 64) - 1
_U32_LIMIT: Final = 1 << 32
_LITTLE: Final = sys.byteorder == "little"

if array("I").itemsize != 4:  # pragma: no cover - every supported platform has a 4-byte uint
    raise ImportError("kvcache.hashing needs array('I') to be 32-bit")


# ---------------------------------------------------------------------------------------------
# Public value types
# ---------------------------------------------------------------------------------------------


class HashAlgorithm(StrEnum):
    """vLLM's ``--prefix-caching-hash-algo`` choices (0.10.2+; xxhash ones 0.13+)."""

    SHA256 = "sha256"
    SHA256_CBOR = "sha256_cbor"
    XXHASH = "xxhash"
    XXHASH_CBOR = "xxhash_cbor"


class ExtraKeyEra(StrEnum):
    """Layout of vLLM's per-block extra keys, by release range."""

    INT_ID = "int_id"
    """0.10.2 – 0.11.0: LoRA int id, bare MM identifier, bare salt."""
    NAME = "name"
    """0.11.1 – 0.18.x: LoRA name, bare MM identifier, bare salt."""
    OFFSET = "offset"
    """0.19 – 0.30: LoRA name, ``(identifier, offset_in_block)``, bare salt."""
    TAGGED = "tagged"
    """0.31+: ``("lora", name, path)``, ``("mm", identifier, offset)``, ``("cache_salt", s)``."""


@dataclass(frozen=True, slots=True)
class MMItem:
    """A multimodal item: its identifier and placeholder range ``[offset, offset+length)``."""

    identifier: str
    offset: int
    length: int

    def __post_init__(self) -> None:
        if not isinstance(self.identifier, str):
            raise ExtraKeysError(f"MMItem.identifier must be str, got {type(self.identifier)}")
        for name in ("offset", "length"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value < _U32_LIMIT:
                raise ExtraKeysError(f"MMItem.{name} must be an int in [0, 2**32), got {value!r}")


@dataclass(frozen=True, slots=True)
class RequestExtras:
    """Request-level inputs to block hashing besides the tokens (LoRA, salt, multimodal)."""

    lora_name: str | None = None
    lora_id: int | None = None
    lora_path: str | None = None
    cache_salt: str | None = None
    mm_items: tuple[MMItem, ...] = ()

    def __post_init__(self) -> None:
        for name in ("lora_name", "lora_path", "cache_salt"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ExtraKeysError(f"RequestExtras.{name} must be str or None, got {value!r}")
        if self.lora_id is not None and type(self.lora_id) is not int:
            raise ExtraKeysError(f"RequestExtras.lora_id must be int or None: {self.lora_id!r}")
        items = self.mm_items
        if not isinstance(items, tuple):
            # Accept any iterable for convenience but store a tuple: the dataclass is hashable.
            items = tuple(items)
            object.__setattr__(self, "mm_items", items)
        for item in items:
            if not isinstance(item, MMItem):
                raise ExtraKeysError(f"RequestExtras.mm_items must hold MMItem, got {item!r}")

    @property
    def uses_lora(self) -> bool:
        """True when any LoRA field is set (vLLM keys the adapter on every block)."""
        return self.lora_name is not None or self.lora_id is not None or self.lora_path is not None


@runtime_checkable
class KeyScheme(Protocol):
    """Computes the u64 block keys an engine (or llm-d) would publish for a token sequence."""

    name: str
    block_size: int

    def block_keys(
        self, tokens: Sequence[int], *, model: str = "", extras: RequestExtras | None = None
    ) -> list[int]:
        """One u64 key per full block; a trailing partial block is ignored."""
        ...


def digest_to_u64(digest: bytes) -> int:
    """The u64 vLLM publishes for a digest: its last 8 bytes, big-endian (zero-padded if short)."""
    if not digest:
        raise HashingError("cannot convert an empty digest to a 64-bit key")
    return int.from_bytes(digest[-8:], "big")
