"""Hand-built preimages: canonical CBOR and pickle-5 scalars, and per-block token encodings.

Proven byte-identical to cbor2 and pickle by tests/property/test_hashing_serialisers.py."""

from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence
from itertools import accumulate, repeat
from typing import Final

import numpy as np
import numpy.typing as npt

from kvcache.errors import (
    ExtraKeysError,
)
from kvcache.hashing.model import _LITTLE, _U64_MASK

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
