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

from kvcache.hashing.llmd import LlmdScheme
from kvcache.hashing.model import (
    ExtraKeyEra,
    HashAlgorithm,
    KeyScheme,
    MMItem,
    RequestExtras,
    TokenIds,
    digest_to_u64,
)
from kvcache.hashing.registry import (
    LEGACY_SCHEME_NAMES,
    SCHEME_NAMES,
    make_scheme,
    vllm_version_profile,
)
from kvcache.hashing.sglang import SglangScheme
from kvcache.hashing.vllm import VllmLegacy64Scheme, VllmScheme

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
