"""SGLang (>= 0.5.6) page hashes: SHA-256 over ``prev || u32le(tokens)``."""

from __future__ import annotations

import hashlib
from array import array
from typing import Final

from kvcache.errors import (
    ExtraKeysError,
    HashingError,
)
from kvcache.hashing.encoding import _keys_from_digests
from kvcache.hashing.model import _LITTLE, RequestExtras, TokenIds
from kvcache.hashing.tokens import _as_u32, _check_block_size

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
