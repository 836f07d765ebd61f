"""Block-key schemes: the keys engines publish, recomputed from token ids.

Three families, exact to the byte:

* ``VllmScheme`` – vLLM v1 prefix-cache hashes (``sha256``, ``sha256_cbor``, ``xxhash``,
  ``xxhash_cbor``): a chain ``h_i = H((parent or NONE_HASH, tokens_i, extra_keys_i))`` over
  pickle protocol 5 or canonical CBOR; the published key is the digest's last 8 bytes.
  ``VllmLegacy64Scheme`` covers 0.10.0 – 0.10.1's ``sha256_cbor_64bit`` int chain.
* ``SglangScheme`` – SGLang (>= 0.5.6) page hashes: SHA-256 over ``prev || u32le(tokens)``;
  the published key is the digest's first 8 bytes.
* ``LlmdScheme`` – llm-d request keys: FNV-1a-64 over canonical CBOR, chained from a root
  derived from the hash seed and the model (or LoRA) name.

Performance: the read path hashes whole prompts, so preimages are built by hand (no cbor2 at
run time; pickle only for blocks too big for one pickle frame). Long prompts get a vectorised
per-token encoding; per block what remains is copying a hasher primed with the constant head,
feeding it the parent and the block bytes, and taking the digest. ``tests/property`` proves the
hand-built bytes equal ``cbor2.dumps(..., canonical=True)`` and ``pickle.dumps(..., 5)``.

Notes:

* Token ids must be ints in ``[0, 2**32)``. ``bool`` is an ``int`` subclass and is accepted as
  0/1: checking each element's exact type would double the read-path cost, and engines never
  produce booleans.
* Pickle memoises by object identity. Tag strings are module constants, as vLLM's are code
  constants, so a tag repeated in one block is written once and then fetched, like vLLM does.
  Caller strings keep their identity: one string object used for two MM items of one block
  pickles differently from two equal strings (vLLM's own output then depends on the same).
* Multimodal items are scanned the way one prefill pass scans them. When vLLM re-hashes a block
  that decoding completed, it resumes its item scan at the last item; before 0.19 (``>`` test)
  that can add an item ending exactly at the block start. Prompt blocks, which are what the
  read path routes on, are always hashed in the prefill pass.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import sys
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from itertools import accumulate, repeat
from typing import Any, Final, Protocol, TypeAlias, runtime_checkable

import numpy as np
import numpy.typing as npt
import xxhash

from kvcache.errors import (
    ConfigError,
    ExtraKeysError,
    HashingError,
    InvalidTokenError,
    UnknownSchemeError,
)

__all__ = [
    "LEGACY_SCHEME_NAMES",
    "SCHEME_NAMES",
    "ExtraKeyEra",
    "HashAlgorithm",
    "KeyScheme",
    "LlmdScheme",
    "MMItem",
    "RequestExtras",
    "SglangScheme",
    "TokenIds",
    "VllmLegacy64Scheme",
    "VllmScheme",
    "digest_to_u64",
    "make_scheme",
    "vllm_version_profile",
]

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


# ---------------------------------------------------------------------------------------------
# Scalar serialisers (canonical CBOR, pickle protocol 5) for parents and extra keys
# ---------------------------------------------------------------------------------------------


def _cbor_head(major: int, value: int) -> bytes:
    """Shortest-form CBOR head, as cbor2 (canonical) and Go's canonical encoder emit."""
    mt = major << 5
    if value < 24:
        return bytes((mt | value,))
    if value < 0x100:
        return bytes((mt | 24, value))
    if value < 0x10000:
        return bytes((mt | 25,)) + value.to_bytes(2, "big")
    if value < 0x100000000:
        return bytes((mt | 26,)) + value.to_bytes(4, "big")
    if value <= _U64_MASK:
        return bytes((mt | 27,)) + value.to_bytes(8, "big")
    raise ExtraKeysError(f"integer {value} does not fit a CBOR head (bignums are not supported)")


def _cbor_text(text: str) -> bytes:
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError as exc:  # cbor2 fails the same way on lone surrogates
        raise ExtraKeysError(f"string {text!r} is not valid UTF-8: {exc}") from None
    return _cbor_head(3, len(raw)) + raw


def _cbor_encode(obj: object, out: list[bytes]) -> None:
    """Canonical CBOR of the shapes vLLM extra keys use: tuples, str, int, bytes, None, bool."""
    if obj is None:
        out.append(b"\xf6")
    elif obj is True:
        out.append(b"\xf5")
    elif obj is False:
        out.append(b"\xf4")
    elif type(obj) is int:
        out.append(_cbor_head(0, obj) if obj >= 0 else _cbor_head(1, -1 - obj))
    elif type(obj) is str:
        out.append(_cbor_text(obj))
    elif type(obj) is bytes:
        out.append(_cbor_head(2, len(obj)))
        out.append(obj)
    elif type(obj) is tuple or type(obj) is list:
        out.append(_cbor_head(4, len(obj)))
        for item in obj:
            _cbor_encode(item, out)
    else:
        raise ExtraKeysError(f"cannot serialise extra key of type {type(obj).__name__}")


def _pickle_int(value: int) -> bytes:
    """CPython's C pickler integer opcodes for protocol >= 2."""
    if 0 <= value < 0x100:
        return b"K" + bytes((value,))
    if 0 <= value < 0x10000:
        return b"M" + value.to_bytes(2, "little")
    if -0x80000000 <= value <= 0x7FFFFFFF:
        return b"J" + value.to_bytes(4, "little", signed=True)
    nbytes = (value.bit_length() >> 3) + 1
    raw = value.to_bytes(nbytes, "little", signed=True)
    if value < 0 and nbytes > 1 and raw[-1] == 0xFF and raw[-2] & 0x80:
        raw = raw[:-1]  # the pickler keeps two's complement minimal for negatives
    if len(raw) < 0x100:
        return b"\x8a" + bytes((len(raw),)) + raw
    return b"\x8b" + len(raw).to_bytes(4, "little", signed=True) + raw


def _pickle_binget(index: int) -> bytes:
    return b"h" + bytes((index,)) if index < 0x100 else b"j" + index.to_bytes(4, "little")


_TUPLE_OPS: Final = (b")", b"\x85", b"\x86", b"\x87")


def _pickle_encode(obj: object, memo: dict[int, int], out: list[bytes]) -> None:
    """Pickle protocol 5 body of ``obj`` exactly as the C pickler writes it inside one frame.

    ``memo`` maps ``id(object)`` to its memo slot; like pickle it works by object identity, so a
    tag constant used twice in one preimage is written once and then fetched (BINGET).
    """
    if obj is None:
        out.append(b"N")
        return
    if obj is True or obj is False:
        out.append(b"\x88" if obj else b"\x89")
        return
    kind = type(obj)
    if kind is int:
        out.append(_pickle_int(obj))  # type: ignore[arg-type]
        return
    slot = memo.get(id(obj))
    if slot is not None:
        out.append(_pickle_binget(slot))
        return
    if kind is str:
        raw = obj.encode("utf-8", "surrogatepass")  # type: ignore[attr-defined]
        n = len(raw)
        if n < 0x100:
            out.append(b"\x8c" + bytes((n,)))
        elif n <= 0xFFFFFFFF:
            out.append(b"X" + n.to_bytes(4, "little"))
        else:  # pragma: no cover - 4 GiB strings
            out.append(b"\x8d" + n.to_bytes(8, "little"))
        out.append(raw)
    elif kind is bytes:
        n = len(obj)  # type: ignore[arg-type]
        if n < 0x100:
            out.append(b"C" + bytes((n,)))
        elif n <= 0xFFFFFFFF:
            out.append(b"B" + n.to_bytes(4, "little"))
        else:  # pragma: no cover
            out.append(b"\x8e" + n.to_bytes(8, "little"))
        out.append(obj)  # type: ignore[arg-type]
    elif kind is tuple:
        items: tuple[object, ...] = obj  # type: ignore[assignment]
        if not items:
            out.append(b")")  # the empty tuple is never memoised
            return
        if len(items) <= 3:
            for item in items:
                _pickle_encode(item, memo, out)
            out.append(_TUPLE_OPS[len(items)])
        else:
            out.append(b"(")
            for item in items:
                _pickle_encode(item, memo, out)
            out.append(b"t")
    else:
        raise ExtraKeysError(f"cannot serialise extra key of type {kind.__name__}")
    memo[id(obj)] = len(memo)
    out.append(b"\x94")


# ---------------------------------------------------------------------------------------------
# Token encoders: the per-block byte strings of the token tuple/array
# ---------------------------------------------------------------------------------------------

# Below this many tokens the pure-Python path wins (numpy has ~35 µs of fixed per-call cost).
_NUMPY_MIN_TOKENS: Final = 384
_CACHE_LIMIT: Final = 1 << 19


def _cbor_token(value: int) -> bytes:
    return _cbor_head(0, value)


def _pickle_token(value: int) -> bytes:
    return _pickle_int(value)


class _EncodingCache(dict[int, bytes]):
    """token id -> encoded bytes, filled lazily; bounded so odd inputs cannot grow it forever."""

    def __init__(self, encode: Callable[[int], bytes]) -> None:
        super().__init__()
        self._encode = encode

    def __missing__(self, token: int) -> bytes:
        encoded = self._encode(token)
        if len(self) < _CACHE_LIMIT:
            self[token] = encoded
        return encoded


_CBOR_CACHE: Final = _EncodingCache(_cbor_token)
_PICKLE_CACHE: Final = _EncodingCache(_pickle_token)


def _bytes_view(values: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint8]:
    # The tables below lay bytes out in little-endian uint64 words.
    little = values if _LITTLE else values.astype("<u8")
    return little.view(np.uint8)


def _prefix_masks(widths: Sequence[int]) -> npt.NDArray[np.uint64]:
    """uint64 words whose first ``w`` bytes are 1: viewed as bool they select ``w`` bytes."""
    words = [int.from_bytes(bytes([1] * w + [0] * (8 - w)), "little") for w in widths]
    return np.array(words, dtype=np.uint64)


# CBOR uint classes: <24 (1 byte), <2**8 (2), <2**16 (3), <2**32 (5). Per class: how far to
# shift the byte-swapped value right (leaving the big-endian payload in the low bytes), how far
# left to make room for the head byte, and the head byte (a tiny value is its own head).
_CBOR_SHIFT: Final = np.array([24, 24, 16, 0], dtype=np.uint64)
_CBOR_ROOM: Final = np.array([0, 8, 8, 8], dtype=np.uint64)
_CBOR_MAJOR: Final = np.array([0, 0x18, 0x19, 0x1A], dtype=np.uint64)
_CBOR_WIDTH: Final = np.array([1, 2, 3, 5], dtype=np.int64)
_CBOR_MASK: Final = _prefix_masks([1, 2, 3, 5])
# Pickle int classes: BININT1 (2 bytes), BININT2 (3), BININT (5), LONG1 with 5 payload bytes (7).
_PICKLE_OPCODE: Final = np.array([0x4B, 0x4D, 0x4A, 0x8A | (5 << 8)], dtype=np.uint64)
_PICKLE_SHIFT: Final = np.array([8, 8, 8, 16], dtype=np.uint64)
_PICKLE_WIDTH: Final = np.array([2, 3, 5, 7], dtype=np.int64)
_PICKLE_MASK: Final = _prefix_masks([2, 3, 5, 7])


def _numpy_cbor(
    t: npt.NDArray[np.uint32],
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64], npt.NDArray[np.int64]]:
    """Tokens as shortest-form CBOR uints: one little-endian word each, its byte mask, width."""
    cls = (t >= 24).view(np.uint8) + (t >= 0x100).view(np.uint8) + (t >= 0x10000).view(np.uint8)
    swapped = t.byteswap().astype(np.uint64)
    words = ((swapped >> _CBOR_SHIFT.take(cls)) << _CBOR_ROOM.take(cls)) | _CBOR_MAJOR.take(cls)
    return words, _CBOR_MASK.take(cls), _CBOR_WIDTH.take(cls)


def _numpy_pickle(
    t: npt.NDArray[np.uint32],
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64], npt.NDArray[np.int64]]:
    """Tokens as the C pickler's int opcodes: one little-endian word each, its mask, width."""
    cls = (
        (t >= 0x100).view(np.uint8)
        + (t >= 0x10000).view(np.uint8)
        + (t >= 0x80000000).view(np.uint8)
    )
    words = (t.astype(np.uint64) << _PICKLE_SHIFT.take(cls)) | _PICKLE_OPCODE.take(cls)
    return words, _PICKLE_MASK.take(cls), _PICKLE_WIDTH.take(cls)


def _words(data: bytes) -> tuple[list[int], list[int]]:
    """``data`` as little-endian uint64 words and the mask words selecting its bytes."""
    chunks = [data[i : i + 8] for i in range(0, len(data), 8)]
    words = [int.from_bytes(chunk, "little") for chunk in chunks]
    return words, [int.from_bytes(b"\x01" * len(chunk), "little") for chunk in chunks]


def _encode_blocks(
    tokens: array[int], block_size: int, cbor: bool, lead: bytes, trail: bytes | list[bytes]
) -> tuple[bytes, list[int]]:
    """Per full block ``lead + encoded tokens + trail``, concatenated, and each block's end.

    ``trail`` is one byte string for every block, or a list with one per block. Long prompts
    are encoded vectorised: a grid holds, per block, the lead's words, one little-endian word
    per token with its encoding, and the trail's words; a parallel grid of mask words marks the
    bytes in use, and one compress drops the padding.
    """
    n = len(tokens) // block_size * block_size
    nb = n // block_size
    join = b"".join
    if n >= _NUMPY_MIN_TOKENS:
        t = np.frombuffer(tokens, dtype=np.uint32, count=n)
        words, masks, widths = _numpy_cbor(t) if cbor else _numpy_pickle(t)
        shared = trail if isinstance(trail, bytes) else b""
        lead_words, lead_masks = _words(lead)
        trail_words, trail_masks = _words(shared)
        a, b = len(lead_words), len(lead_words) + block_size
        grid = np.empty((nb, b + len(trail_words)), dtype=np.uint64)
        keep = np.empty_like(grid)
        grid[:, :a], keep[:, :a] = lead_words, lead_masks
        grid[:, a:b] = words.reshape(nb, block_size)
        keep[:, a:b] = masks.reshape(nb, block_size)
        grid[:, b:], keep[:, b:] = trail_words, trail_masks
        sizes = widths.reshape(nb, block_size).sum(axis=1)
        sizes += len(lead) + len(shared)
        selected = _bytes_view(keep.ravel()).view(np.bool_)
        data = np.compress(selected, _bytes_view(grid.ravel())).tobytes()
        ends: list[int] = np.cumsum(sizes).tolist()
        if isinstance(trail, bytes):
            return data, ends
        starts = [0, *ends[:-1]]
        blocks = [data[s:e] + tail for s, e, tail in zip(starts, ends, trail, strict=True)]
    else:
        cache = _CBOR_CACHE if cbor else _PICKLE_CACHE
        parts = [cache[tok] for tok in tokens[:n]]
        trails = repeat(trail, nb) if isinstance(trail, bytes) else trail
        blocks = [
            join((lead, *parts[i : i + block_size], tail))
            for i, tail in zip(range(0, n, block_size), trails, strict=True)
        ]
    return join(blocks), list(accumulate(map(len, blocks)))


def _keys_from_digests(digests: list[bytes], size: int, first: bool = False) -> list[int]:
    """u64 of each digest: last 8 bytes big-endian (vLLM), or first 8 bytes (SGLang)."""
    if len(digests) < 16:
        if first:
            return [int.from_bytes(d[:8], "big") for d in digests]
        return [int.from_bytes(d[-8:], "big") for d in digests]
    table = np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(-1, size)
    picked = table[:, :8] if first else table[:, size - 8 :]
    keys: list[int] = np.ascontiguousarray(picked).view(">u8").ravel().tolist()
    return keys


# ---------------------------------------------------------------------------------------------
# vLLM extra keys
# ---------------------------------------------------------------------------------------------

# vLLM's tag literals are code constants, so within one pickled preimage a repeated tag is the
# same object and pickle writes it once then BINGETs it. Module constants reproduce that.
_TAG_LORA: Final = "lora"
_TAG_MM: Final = "mm"
_TAG_SALT: Final = "cache_salt"

ExtraKeys: TypeAlias = tuple[object, ...] | None


def _vllm_block_extras(
    extras: RequestExtras | None,
    era: ExtraKeyEra,
    block_size: int,
    first_block: int,
    num_blocks: int,
) -> list[ExtraKeys] | None:
    """Per-block extra-keys tuples as vLLM builds them (None when no block has any)."""
    if extras is None:
        return None
    salt = extras.cache_salt if first_block == 0 and extras.cache_salt else None
    if not extras.uses_lora and not extras.mm_items and salt is None:
        return None

    lora_keys: list[object] = []
    if extras.uses_lora:
        if era is ExtraKeyEra.INT_ID:
            if extras.lora_id is None:
                raise ExtraKeysError("vLLM 0.10.2-0.11.0 keys LoRA blocks by lora_id; none given")
            lora_keys.append(extras.lora_id)
        elif extras.lora_name is None:
            raise ExtraKeysError(f"vLLM extra-key era {era.value!r} needs lora_name for LoRA")
        elif era is ExtraKeyEra.TAGGED:
            if extras.lora_path is None:
                raise ExtraKeysError(
                    "vLLM >= 0.31 hashes ('lora', name, path): lora_path is required "
                    "(events do not carry it; take it from the adapter configuration)"
                )
            lora_keys.append((_TAG_LORA, extras.lora_name, extras.lora_path))
        else:
            lora_keys.append(extras.lora_name)
    # One shared tuple for the common "LoRA only" block, so its serialisation is computed once.
    lora_only: ExtraKeys = tuple(lora_keys) if lora_keys else None

    items = sorted(extras.mm_items, key=lambda item: item.offset)
    if not items and salt is None:
        return [lora_only] * num_blocks

    # vLLM <= 0.18 tests "block passed the item" with '>', 0.19+ with '>='.
    strict = era in (ExtraKeyEra.INT_ID, ExtraKeyEra.NAME)
    last_end = items[-1].offset + items[-1].length if items else -1
    mm_index = 0
    out: list[ExtraKeys] = []
    total = first_block + num_blocks
    # Blocks starting after the last item's end carry no MM keys (vLLM's early return).
    scanned = min(total, last_end // block_size + 1) if items else min(total, 1)
    for block in range(scanned):
        start = block * block_size
        end = start + block_size
        mm_keys: list[object] = []
        # Replays vLLM's resumable scan over the offset-sorted items; blocks before first_block
        # are scanned (not hashed) so the item cursor is where a single prefill pass leaves it.
        if items and last_end >= start:
            while mm_index < len(items):
                item = items[mm_index]
                if end <= item.offset:
                    break
                item_end = item.offset + item.length
                if (start > item_end) if strict else (start >= item_end):
                    mm_index += 1
                    continue
                if block >= first_block:
                    mm_keys.append(_mm_key(item, start, era))
                if end >= item_end:
                    mm_index += 1
                else:
                    break
        if block < first_block:
            continue
        if not mm_keys and (salt is None or block != 0):
            out.append(lora_only)
            continue
        keys = [*lora_keys, *mm_keys]
        if salt is not None and block == 0:
            keys.append((_TAG_SALT, salt) if era is ExtraKeyEra.TAGGED else salt)
        out.append(tuple(keys))
    out.extend([lora_only] * (total - max(scanned, first_block)))
    return out


def _mm_key(item: MMItem, block_start: int, era: ExtraKeyEra) -> object:
    if era is ExtraKeyEra.TAGGED:
        return (_TAG_MM, item.identifier, item.offset - block_start)
    if era is ExtraKeyEra.OFFSET:
        return (item.identifier, item.offset - block_start)
    return item.identifier


# ---------------------------------------------------------------------------------------------
# vLLM schemes
# ---------------------------------------------------------------------------------------------

_DEFAULT_SEED: Final = "vllm-none-hash"
_FRAME_TARGET: Final = 64 * 1024  # CPython's pickle frame size target


def _new_hasher(algorithm: HashAlgorithm) -> Callable[[bytes], Any]:
    if algorithm in (HashAlgorithm.SHA256, HashAlgorithm.SHA256_CBOR):
        return hashlib.sha256
    return xxhash.xxh3_128


class VllmScheme:
    """vLLM v1 prefix-cache block hashes for one algorithm, seed, block size and key era."""

    __slots__ = (
        "_cbor",
        "_cbor_prefix",
        "_cbor_primed",
        "_new",
        "_pickle_heads",
        "_pickle_mid",
        "_pickle_open",
        "_pickle_prefix",
        "_pickle_stop",
        "algorithm",
        "block_size",
        "digest_size",
        "era",
        "name",
        "none_hash",
        "seed",
    )

    def __init__(
        self,
        algorithm: HashAlgorithm | str = "sha256",
        *,
        seed: str | None = None,
        block_size: int = 16,
        era: ExtraKeyEra | str = ExtraKeyEra.TAGGED,
    ) -> None:
        try:
            self.algorithm = HashAlgorithm(algorithm)
        except ValueError:
            raise UnknownSchemeError(
                "algorithm",
                f"unknown vLLM hash algorithm {algorithm!r}; "
                f"expected one of {[a.value for a in HashAlgorithm]}",
            ) from None
        try:
            self.era = ExtraKeyEra(era)
        except ValueError:
            raise UnknownSchemeError(
                "era",
                f"unknown extra-key era {era!r}; expected one of {[e.value for e in ExtraKeyEra]}",
            ) from None
        self.block_size = _check_block_size(block_size)
        self.name = self.algorithm.value
        self._cbor = self.algorithm in (HashAlgorithm.SHA256_CBOR, HashAlgorithm.XXHASH_CBOR)
        self._new = _new_hasher(self.algorithm)
        self.digest_size = 32 if self.algorithm.value.startswith("sha256") else 16
        if seed is None:
            if self.digest_size == 16:
                raise ConfigError(
                    "seed",
                    f"{self.name}: vLLM seeds NONE_HASH randomly per process unless "
                    "PYTHONHASHSEED is set; start the engine with PYTHONHASHSEED and pass the "
                    "same value as seed",
                )
            seed = _DEFAULT_SEED  # vLLM >= 0.29 with PYTHONHASHSEED unset
        if not isinstance(seed, str):
            raise ConfigError("seed", f"must be a string (PYTHONHASHSEED value), got {seed!r}")
        self.seed = seed
        self.none_hash: bytes = self._hash(self._serialise(seed))

        bs = self.block_size
        size = self.digest_size
        # Constant pieces around the parent digest and the token bytes of every preimage.
        self._cbor_prefix = b"\x83" + _cbor_head(2, size)
        self._cbor_primed = self._new(self._cbor_prefix)  # copied per block: see _run_chain
        self._pickle_prefix = b"C" + bytes((size,))
        # After the parent: MEMOIZE, then the token tuple's opener (MARK for > 3 items).
        self._pickle_open = b"\x94(" if bs > 3 else b"\x94"
        # After the tokens: TUPLE (or TUPLE1-3), MEMOIZE; after the extras: TUPLE3 MEMOIZE STOP.
        self._pickle_mid = (b"t" if bs > 3 else _TUPLE_OPS[bs]) + b"\x94"
        self._pickle_stop = b"\x87\x94."
        self._pickle_heads: dict[int, Any] = {}  # block length -> hasher primed with its head

    def __repr__(self) -> str:
        return (
            f"VllmScheme({self.name!r}, seed={self.seed!r}, block_size={self.block_size}, "
            f"era={self.era.value!r})"
        )

    # -- public API ---------------------------------------------------------------------------

    def block_keys(
        self, tokens: TokenIds, *, model: str = "", extras: RequestExtras | None = None
    ) -> list[int]:
        """u64 keys of the full blocks (``model`` is not part of vLLM's hash)."""
        digests = self.block_digests(tokens, extras=extras)
        return _keys_from_digests(digests, self.digest_size)

    def block_digests(
        self,
        tokens: TokenIds,
        *,
        parent: bytes | None = None,
        extras: RequestExtras | None = None,
        first_block: int = 0,
    ) -> list[bytes]:
        """Full digests of the full blocks, chained from ``parent`` (NONE_HASH if None/empty).

        ``tokens`` start at block ``first_block`` of the request: the cache salt only goes into
        block 0 and multimodal offsets are request positions. The MM item cursor is replayed as
        a single prefill pass would leave it (see the module notes for decode-time re-hashing).
        """
        return self._chain(tokens, parent, extras, first_block, None)

    def block_preimages(
        self,
        tokens: TokenIds,
        *,
        parent: bytes | None = None,
        extras: RequestExtras | None = None,
        first_block: int = 0,
    ) -> list[bytes]:
        """The exact bytes hashed for each full block (debugging and byte-level tests)."""
        keep: list[bytes] = []
        self._chain(tokens, parent, extras, first_block, keep)
        return keep

    def block_extra_keys(
        self, num_blocks: int, *, extras: RequestExtras | None = None, first_block: int = 0
    ) -> list[ExtraKeys]:
        """The extra-keys tuple (or None) that enters each block's hash."""
        if type(first_block) is not int or first_block < 0:
            raise HashingError(f"first_block must be an int >= 0, got {first_block!r}")
        per_block = _vllm_block_extras(extras, self.era, self.block_size, first_block, num_blocks)
        return [None] * num_blocks if per_block is None else per_block

    # -- internals ----------------------------------------------------------------------------

    def _hash(self, data: bytes) -> bytes:
        digest: bytes = self._new(data).digest()
        return digest

    def _serialise(self, obj: object) -> bytes:
        if self._cbor:
            out: list[bytes] = []
            _cbor_encode(obj, out)
            return b"".join(out)
        return pickle.dumps(obj, protocol=5)

    def _chain(
        self,
        tokens: TokenIds,
        parent: bytes | None,
        extras: RequestExtras | None,
        first_block: int,
        keep: list[bytes] | None,
    ) -> list[bytes]:
        u32 = _as_u32(tokens)
        if type(first_block) is not int or first_block < 0:
            raise HashingError(f"first_block must be an int >= 0, got {first_block!r}")
        bs = self.block_size
        num_blocks = len(u32) // bs
        if not parent:  # vLLM: `if not parent` -> NONE_HASH
            parent = self.none_hash
        elif type(parent) is not bytes or len(parent) != self.digest_size:
            raise HashingError(
                f"{self.name} parent must be {self.digest_size} raw digest bytes, got {parent!r}"
            )
        if num_blocks == 0:
            return []
        per_block = _vllm_block_extras(extras, self.era, bs, first_block, num_blocks)
        trail: bytes | list[bytes]
        if self._cbor:
            # (parent, tokens, extras) -> 0x83, bytes(parent), array(tokens), extras-or-null.
            trail = b"\xf6" if per_block is None else self._serialise_each(per_block)
            data, ends = _encode_blocks(u32, bs, True, _cbor_head(4, bs), trail)
            return self._run_chain(data, ends, None, parent, keep)

        # Pickle: PROTO, FRAME(len), parent bytes, MEMOIZE, token tuple, extras, TUPLE3, STOP.
        mid = self._pickle_mid
        stop = self._pickle_stop
        if per_block is None:
            trail = mid + b"N" + stop
        else:
            tails = self._serialise_each(per_block)
            if isinstance(tails, bytes):
                trail = mid + tails + stop
            else:
                trail = [mid + tail + stop for tail in tails]
        longest_trail = len(trail) if isinstance(trail, bytes) else max(map(len, trail))
        lead = self._pickle_open
        fixed = len(self._pickle_prefix) + self.digest_size
        # A frame body reaching 64 KiB is split by the pickler at an opcode boundary (and big
        # strings leave the frame): leave such blocks to pickle itself. 7 bytes bound a token.
        if fixed + len(lead) + 7 * bs + longest_trail >= _FRAME_TARGET - 16:
            return self._chain_pickle_slow(u32, per_block, parent, keep)
        data, ends = _encode_blocks(u32, bs, False, lead, trail)
        return self._run_chain(data, ends, self._pickle_heads, parent, keep)

    def _serialise_each(self, per_block: list[ExtraKeys]) -> bytes | list[bytes]:
        """Serialised extra keys per block, each distinct tuple object serialised once.

        Returns a single byte string when every block has the same keys (e.g. LoRA only), so
        the caller can lay the blocks out in one vectorised pass.
        """
        cache: dict[int, bytes] = {}
        out: list[bytes] = []
        for keys in per_block:
            encoded = cache.get(id(keys))
            if encoded is None:
                parts: list[bytes] = []
                if self._cbor:
                    _cbor_encode(keys, parts)
                else:
                    # Memo slots 0 and 1 are taken by the parent bytes and the token tuple.
                    _pickle_encode(keys, {-1: 0, -2: 1}, parts)
                encoded = cache[id(keys)] = b"".join(parts)
            out.append(encoded)
        return out[0] if len(cache) == 1 else out

    def _pickle_head(self, block_length: int) -> bytes:
        """PROTO 5, FRAME(body length), SHORT_BINBYTES opcode: what precedes the parent."""
        body = len(self._pickle_prefix) + self.digest_size + block_length
        return b"\x80\x05\x95" + body.to_bytes(8, "little") + self._pickle_prefix

    def _run_chain(
        self,
        data: bytes,
        ends: list[int],
        primed: dict[int, Any] | None,
        parent: bytes,
        keep: list[bytes] | None,
    ) -> list[bytes]:
        """Hash ``head + parent + block`` for each block of ``data``, chaining the digests.

        The head is fixed for CBOR (``primed`` None) and depends on the block's length for
        pickle (its frame header). Copying a hasher that already absorbed the head is cheaper
        than a fresh hasher plus joining the preimage, so primed hashers are kept: one for CBOR,
        one per block length for pickle (in ``primed``, shared across calls).
        """
        new = self._new
        out: list[bytes] = []
        append = out.append
        start = 0
        if keep is not None:
            for end in ends:
                head = self._cbor_prefix if primed is None else self._pickle_head(end - start)
                preimage = head + parent + data[start:end]
                keep.append(preimage)
                parent = new(preimage).digest()
                append(parent)
                start = end
            return out
        view = memoryview(data)
        if primed is None:
            copy = self._cbor_primed.copy
            for end in ends:
                hasher = copy()
                hasher.update(parent)
                hasher.update(view[start:end])
                parent = hasher.digest()
                append(parent)
                start = end
            return out
        for end in ends:
            length = end - start
            base = primed.get(length)
            if base is None:
                base = new(self._pickle_head(length))
                if len(primed) < 4096:
                    primed[length] = base
            hasher = base.copy()
            hasher.update(parent)
            hasher.update(view[start:end])
            parent = hasher.digest()
            append(parent)
            start = end
        return out

    def _chain_pickle_slow(
        self,
        u32: array[int],
        per_block: list[ExtraKeys] | None,
        parent: bytes,
        keep: list[bytes] | None,
    ) -> list[bytes]:
        bs = self.block_size
        n = len(u32) // bs
        out: list[bytes] = []
        for i in range(n):
            keys = None if per_block is None else per_block[i]
            data = pickle.dumps((parent, tuple(u32[i * bs : (i + 1) * bs]), keys), protocol=5)
            parent = self._hash(data)
            out.append(parent)
            if keep is not None:
                keep.append(data)
        return out


class VllmLegacy64Scheme:
    """vLLM 0.10.0 – 0.10.1.1 ``sha256_cbor_64bit``: a chain of 64-bit ints, not digests.

    ``h_i = low64(SHA-256(CBOR((h_{i-1} or NONE_HASH, tokens_i, extra_keys_i))))`` with the
    parent as a CBOR uint and NONE_HASH = ``low64(SHA-256(CBOR(seed)))``; events carry h_i as is.
    Extra keys use that release's layout (LoRA int id, MM identifier, salt).
    """

    __slots__ = ("block_size", "name", "none_hash", "seed")

    def __init__(self, *, seed: str | None, block_size: int = 16) -> None:
        if not isinstance(seed, str):
            raise ConfigError(
                "seed",
                "vLLM 0.10.0-0.10.1 uses a random NONE_HASH unless PYTHONHASHSEED is set; "
                "pass that value as seed",
            )
        self.name = "sha256_cbor_64bit"
        self.seed = seed
        self.block_size = _check_block_size(block_size)
        self.none_hash: int = _low64_sha256(_cbor_text(seed))

    def __repr__(self) -> str:
        return f"VllmLegacy64Scheme(seed={self.seed!r}, block_size={self.block_size})"

    def block_keys(
        self, tokens: TokenIds, *, model: str = "", extras: RequestExtras | None = None
    ) -> list[int]:
        """The 64-bit hash of each full block (what those releases publish)."""
        return self.chain(tokens, extras=extras)

    def chain(
        self,
        tokens: TokenIds,
        *,
        parent: int | None = None,
        extras: RequestExtras | None = None,
        first_block: int = 0,
    ) -> list[int]:
        """Continue the int chain from ``parent`` (NONE_HASH when None or 0)."""
        u32 = _as_u32(tokens)
        if parent is not None and (type(parent) is not int or not 0 <= parent <= _U64_MASK):
            raise HashingError(f"parent must be a u64 int, got {parent!r}")
        if type(first_block) is not int or first_block < 0:
            raise HashingError(f"first_block must be an int >= 0, got {first_block!r}")
        bs = self.block_size
        n = len(u32) // bs
        if n == 0:
            return []
        per_block = _vllm_block_extras(extras, ExtraKeyEra.INT_ID, bs, first_block, n)
        trail: bytes | list[bytes] = b"\xf6"
        if per_block is not None:
            trail = []
            for keys in per_block:
                parts: list[bytes] = []
                _cbor_encode(keys, parts)
                trail.append(b"".join(parts))
        data, ends = _encode_blocks(u32, bs, True, _cbor_head(4, bs), trail)
        value = parent or self.none_hash
        out: list[int] = []
        start = 0
        for end in ends:
            value = _low64_sha256(b"\x83" + _cbor_head(0, value) + data[start:end])
            out.append(value)
            start = end
        return out


def _low64_sha256(data: bytes) -> int:
    return int.from_bytes(hashlib.sha256(data).digest()[-8:], "big")


# ---------------------------------------------------------------------------------------------
# SGLang
# ---------------------------------------------------------------------------------------------

_SGLANG_SALT_DOMAIN: Final = b"sglang-cache-salt-v1\x00"


class SglangScheme:
    """SGLang (>= 0.5.6) page hashes: ``d_k = SHA-256(d_{k-1} || u32le(page tokens))``.

    The first page of an unsalted chain has no prior; with a cache salt (0.5.18+) the prior is
    ``SHA-256(b"sglang-cache-salt-v1\\0" + salt)``. SGLang publishes the first 8 digest bytes as
    a signed int64; ``block_keys`` returns that value as unsigned (``& (2**64 - 1)``). The
    default ``block_size`` is SGLang's default page size, 1.
    """

    __slots__ = ("block_size", "name")

    def __init__(self, block_size: int = 1) -> None:
        self.name = "sglang"
        self.block_size = _check_block_size(block_size)

    def __repr__(self) -> str:
        return f"SglangScheme(block_size={self.block_size})"

    def block_keys(
        self, tokens: TokenIds, *, model: str = "", extras: RequestExtras | None = None
    ) -> list[int]:
        """u64 view of the published int64 per full page (``model`` is not hashed)."""
        return _keys_from_digests(self.page_digests(tokens, extras=extras), 32, first=True)

    def page_digests(
        self, tokens: TokenIds, *, parent: bytes | None = None, extras: RequestExtras | None = None
    ) -> list[bytes]:
        """Chained SHA-256 digests of the full pages, continuing from ``parent`` if given."""
        u32 = _as_u32(tokens)
        if extras is not None and (extras.uses_lora or extras.mm_items):
            # SGLang's default page hash covers token ids only (MM inputs are already folded into
            # the padded token ids); refuse rather than return keys that silently ignore them.
            raise ExtraKeysError("SGLang page hashes take no LoRA or multimodal extra keys")
        if parent is None:
            if extras is not None and extras.cache_salt:
                salt = extras.cache_salt.encode("utf-8")
                parent = hashlib.sha256(_SGLANG_SALT_DOMAIN + salt).digest()
            else:
                parent = b""
        elif type(parent) is not bytes or len(parent) != 32:
            raise HashingError(f"SGLang parent must be 32 digest bytes, got {parent!r}")
        step = self.block_size * 4
        data = u32.tobytes() if _LITTLE else _byteswapped(u32)
        sha = hashlib.sha256
        out: list[bytes] = []
        append = out.append
        for start in range(0, len(data) - step + 1, step):
            parent = sha(parent + data[start : start + step]).digest()
            append(parent)
        return out


def _byteswapped(u32: array[int]) -> bytes:  # pragma: no cover - big-endian hosts only
    copy = array("I", u32)
    copy.byteswap()
    return copy.tobytes()


# ---------------------------------------------------------------------------------------------
# llm-d request keys (FNV-1a-64 over canonical CBOR)
# ---------------------------------------------------------------------------------------------

_FNV_OFFSET: Final = 0xCBF29CE484222325
_FNV_PRIME: Final = 0x100000001B3
_HASH_KEY: Final = b"\xa1\x64Hash"  # one-key map header + CBOR text "Hash"


def _fnv1a64(data: bytes) -> int:
    """FNV-1a-64 of ``data``.

    Four bytes per iteration and one mask per four: the low 64 bits of xor and multiply depend
    only on the low 64 bits of their inputs, so the intermediate may grow before masking.
    """
    h = _FNV_OFFSET
    p = _FNV_PRIME
    cut = len(data) & ~3
    it = iter(data[:cut])
    for a, b, c, d in zip(it, it, it, it, strict=True):
        h = ((((((((h ^ a) * p) ^ b) * p) ^ c) * p) ^ d) * p) & _U64_MASK
    for a in data[cut:]:
        h = ((h ^ a) * p) & _U64_MASK
    return h


class LlmdScheme:
    """llm-d request keys: ``key_i = FNV-1a-64(CBOR([parent, tokens_i, extra_i]))``.

    The chain starts at ``root(model) = FNV-1a-64(CBOR([FNV-1a-64(seed), null, model]))``; a
    LoRA request uses its adapter name as the model. ``extra_i`` is null, or for multimodal
    blocks ``[{"Hash": identifier}, ...]`` for every item overlapping the block, ordered by
    placeholder start. Cache salt and LoRA id/path are not part of llm-d's keys.
    """

    __slots__ = ("_roots", "block_size", "name", "seed", "seed64")

    def __init__(self, *, seed: str = "", block_size: int = 16) -> None:
        if not isinstance(seed, str):
            raise ConfigError("seed", f"must be a string, got {seed!r}")
        self.name = "llmd-fnv64a"
        self.seed = seed
        self.block_size = _check_block_size(block_size)
        self.seed64 = _fnv1a64(seed.encode("utf-8"))
        self._roots: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"LlmdScheme(seed={self.seed!r}, block_size={self.block_size})"

    def root(self, model: str) -> int:
        """The chain root for ``model`` (memoised: a fleet serves few models)."""
        key = self._roots.get(model)
        if key is None:
            if not isinstance(model, str):
                raise ConfigError("model", f"must be a string, got {model!r}")
            key = _fnv1a64(b"\x83" + _cbor_head(0, self.seed64) + b"\xf6" + _cbor_text(model))
            self._roots[model] = key
        return key

    def block_keys(
        self, tokens: TokenIds, *, model: str = "", extras: RequestExtras | None = None
    ) -> list[int]:
        """Request keys of the full blocks of a prompt for ``model``."""
        u32 = _as_u32(tokens)
        features: list[list[str]] | None = None
        if extras is not None:
            if extras.lora_name:
                model = extras.lora_name
            if extras.mm_items:
                features = self.mm_features(extras.mm_items, len(u32) // self.block_size)
        return self.chain(u32, model=model, block_extras=features)

    def mm_features(self, items: Sequence[MMItem], num_blocks: int) -> list[list[str]]:
        """Identifiers of the items overlapping each block, ordered by placeholder start."""
        ordered = sorted(items, key=lambda item: item.offset)
        bs = self.block_size
        out: list[list[str]] = []
        for block in range(num_blocks):
            start = block * bs
            end = start + bs
            out.append(
                [
                    item.identifier
                    for item in ordered
                    if item.offset < end and item.offset + item.length > start
                ]
            )
        return out

    def chain(
        self,
        tokens: TokenIds,
        *,
        parent: int | None = None,
        model: str = "",
        block_extras: Sequence[Sequence[str] | None] | None = None,
    ) -> list[int]:
        """Keys of the full blocks, continuing from ``parent`` (``root(model)`` if None or 0).

        ``block_extras`` gives each block's MM identifiers (None or empty for a text block);
        when given, its length must equal the number of full blocks, as upstream requires.
        """
        u32 = _as_u32(tokens)
        bs = self.block_size
        n = len(u32) // bs
        if block_extras is not None and len(block_extras) != n:
            raise ExtraKeysError(
                f"block_extras has {len(block_extras)} entries for {n} full blocks"
            )
        if not parent:
            parent = self.root(model)
        elif type(parent) is not int or not 0 < parent <= _U64_MASK:
            raise HashingError(f"llm-d parent key must be a u64 int, got {parent!r}")
        if n == 0:
            return []
        trail: bytes | list[bytes] = b"\xf6"
        if block_extras is not None:
            trail = [_llmd_extra(ids) for ids in block_extras]
        data, ends = _encode_blocks(u32, bs, True, _cbor_head(4, bs), trail)
        out: list[int] = []
        append = out.append
        start = 0
        for end in ends:
            parent = _fnv1a64(b"\x83" + _cbor_head(0, parent) + data[start:end])
            append(parent)
            start = end
        return out


def _llmd_extra(ids: Sequence[str] | None) -> bytes:
    if not ids:
        return b"\xf6"
    parts = [_cbor_head(4, len(ids))]
    for identifier in ids:
        if not isinstance(identifier, str):
            raise ExtraKeysError(f"MM identifier must be str, got {identifier!r}")
        parts.append(_HASH_KEY)
        parts.append(_cbor_text(identifier))
    return b"".join(parts)


# ---------------------------------------------------------------------------------------------
# Factory and version profiles
# ---------------------------------------------------------------------------------------------

SCHEME_NAMES: Final[tuple[str, ...]] = (
    "sha256",
    "sha256_cbor",
    "xxhash",
    "xxhash_cbor",
    "sglang",
    "llmd-fnv64a",
)
LEGACY_SCHEME_NAMES: Final[tuple[str, ...]] = ("sha256_cbor_64bit",)
"""Also accepted by ``make_scheme``: vLLM 0.10.0 – 0.10.1.1's int chain."""

# X.Y[.Z[.W]] plus PEP 440 pre/post/dev/local suffixes ("0.10.1.1", "0.19.0rc1", "0.32.0+cpu").
_VERSION_RE: Final = re.compile(
    r"v?(\d+)\.(\d+)(?:\.(\d+))?(?:\.\d+)?"
    r"(?:\.?post\d*|\.?(?:rc|a|b|dev)\d*|\+[0-9A-Za-z.]+)*"
)


def _parse_version(version: str) -> tuple[int, int, int]:
    if not isinstance(version, str):
        raise ConfigError("vllm_version", f"must be a version string, got {version!r}")
    match = _VERSION_RE.fullmatch(version.strip())
    if match is None:
        raise ConfigError("vllm_version", f"{version!r} is not a vLLM version like '0.32.0'")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def vllm_version_profile(version: str) -> ExtraKeyEra:
    """The extra-key layout of a vLLM release ("0.32", "0.18.1", "0.11.1.post1", ...)."""
    parsed = _parse_version(version)
    if parsed < (0, 10, 2):
        raise ConfigError(
            "vllm_version",
            f"vLLM {version} predates digest-chained block hashes (0.10.2); its hashes are "
            "process-local ints (use scheme 'sha256_cbor_64bit' for 0.10.0-0.10.1 with a seed)",
        )
    if parsed < (0, 11, 1):
        return ExtraKeyEra.INT_ID
    if parsed < (0, 19, 0):
        return ExtraKeyEra.NAME
    if parsed < (0, 31, 0):
        return ExtraKeyEra.OFFSET
    return ExtraKeyEra.TAGGED


def make_scheme(
    name: str,
    *,
    seed: str | None = None,
    block_size: int = 16,
    vllm_version: str | None = None,
) -> KeyScheme:
    """Build a scheme by name (``SCHEME_NAMES``); vLLM schemes honour ``vllm_version``.

    With a version, configurations vLLM cannot reproduce are refused: xxhash before 0.13, and
    no seed before 0.29 (NONE_HASH was random then). SGLang ignores ``seed`` and
    ``vllm_version``; llm-d uses ``seed`` ("" when None) as its hash seed.
    """
    if name in ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor"):
        era = ExtraKeyEra.TAGGED
        if vllm_version is not None:
            era = vllm_version_profile(vllm_version)
            parsed = _parse_version(vllm_version)
            if name.startswith("xxhash") and parsed < (0, 13, 0):
                raise ConfigError("vllm_version", f"{name} exists only in vLLM >= 0.13")
            if seed is None and parsed < (0, 29, 0):
                raise ConfigError(
                    "seed",
                    f"vLLM {vllm_version} draws NONE_HASH from os.urandom when PYTHONHASHSEED is "
                    "unset, so its hashes cannot be reproduced; set PYTHONHASHSEED on the engine "
                    "and pass it as seed",
                )
        return VllmScheme(name, seed=seed, block_size=block_size, era=era)
    if name == "sglang":
        return SglangScheme(block_size)
    if name == "llmd-fnv64a":
        return LlmdScheme(seed="" if seed is None else seed, block_size=block_size)
    if name == "sha256_cbor_64bit":
        return VllmLegacy64Scheme(seed=seed, block_size=block_size)
    raise UnknownSchemeError(
        "scheme", f"unknown key scheme {name!r}; expected one of {list(SCHEME_NAMES)}"
    )
