"""llm-d's request keys: FNV-1a-64 over canonical CBOR, chained from a seeded root."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from kvcache.errors import (
    ConfigError,
    ExtraKeysError,
    HashingError,
)
from kvcache.hashing.encoding import _cbor_head, _cbor_text, _encode_blocks
from kvcache.hashing.model import _U64_MASK, MMItem, RequestExtras, TokenIds
from kvcache.hashing.tokens import _as_u32, _check_block_size

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
