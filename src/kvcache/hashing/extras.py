"""vLLM's per-block extra keys: LoRA, multimodal items (with offsets by era) and cache salt."""

from __future__ import annotations

from typing import Final, TypeAlias

from kvcache.errors import (
    ExtraKeysError,
)
from kvcache.hashing.model import ExtraKeyEra, MMItem, RequestExtras

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
