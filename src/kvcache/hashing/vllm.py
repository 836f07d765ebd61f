"""vLLM v1 prefix-cache block hashes (sha256, sha256_cbor, xxhash, xxhash_cbor) and the
0.10.0-0.10.1 ``sha256_cbor_64bit`` int chain."""

from __future__ import annotations

import hashlib
import pickle
from array import array
from collections.abc import Callable
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import xxhash

from kvcache.errors import (
    ConfigError,
    HashingError,
    UnknownSchemeError,
)
from kvcache.hashing.encoding import (
    _TUPLE_OPS,
    _cbor_encode,
    _cbor_head,
    _cbor_text,
    _encode_blocks,
    _keys_from_digests,
    _pickle_encode,
)
from kvcache.hashing.extras import ExtraKeys, _vllm_block_extras
from kvcache.hashing.model import _U64_MASK, ExtraKeyEra, HashAlgorithm, RequestExtras, TokenIds
from kvcache.hashing.tokens import _as_u32, _check_block_size

try:
    from kvcache.hashing import _chain as _native
except ImportError:  # built without a C compiler: the hashlib paths serve
    _native = None  # type: ignore[assignment]

KERNEL_AVAILABLE = _native is not None
"""Whether the compiled chain kernel was built (see `VllmScheme`'s ``kernel``)."""
_KERNEL_MAX_BLOCK: Final = 1 << 20  # the kernel's bound on its per-call buffer

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
        "_kernel_mode",
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
        kernel: bool | None = None,
    ) -> None:
        """``kernel``: hash plain-token chains with the compiled kernel (None: when built)."""
        if kernel and not KERNEL_AVAILABLE:
            raise ConfigError("kernel", "the compiled chain kernel was not built in this install")
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
        # The kernel does SHA-256 chains without extra keys; pickle blocks only while they fit
        # one pickle frame (as for the hand-built path below).
        self._kernel_mode: int | None = None
        usable = kernel is not False and _native is not None and bs <= _KERNEL_MAX_BLOCK
        if usable and self.digest_size == 32:
            if self._cbor:
                self._kernel_mode = _native.MODE_CBOR
            elif 2 + size + 2 + 7 * bs + 6 < _FRAME_TARGET - 16:
                self._kernel_mode = _native.MODE_PICKLE

    @property
    def kernel(self) -> bool:
        """Whether the compiled kernel hashes this scheme's chains (those without extra keys)."""
        return self._kernel_mode is not None

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
        if extras is None and self._kernel_mode is not None:
            keys: list[int] = self.block_key_array(tokens).tolist()
            return keys
        digests = self.block_digests(tokens, extras=extras)
        return _keys_from_digests(digests, self.digest_size)

    def block_key_array(
        self, tokens: TokenIds, *, model: str = "", extras: RequestExtras | None = None
    ) -> npt.NDArray[np.uint64]:
        """`block_keys` as a u64 array, what `Index.lookup_runs` takes without converting.

        ``tokens`` may also be any 1-D buffer of native integers (e.g. a uint32 ndarray).
        """
        if extras is None and self._kernel_mode is not None:
            raw = _kernel(_native.keys, tokens, self.block_size, self._kernel_mode, self.none_hash)
            return np.frombuffer(raw, dtype=np.uint64)
        return np.array(self.block_keys(tokens, model=model, extras=extras), dtype=np.uint64)

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
        if per_block is None and keep is None and self._kernel_mode is not None:
            digests: list[bytes] = _native.digests(u32, bs, self._kernel_mode, parent)
            return digests
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

    __slots__ = ("block_size", "kernel", "name", "none_hash", "seed")

    def __init__(
        self, *, seed: str | None, block_size: int = 16, kernel: bool | None = None
    ) -> None:
        """``kernel``: hash chains without extra keys with the compiled kernel (None: if built)."""
        if kernel and not KERNEL_AVAILABLE:
            raise ConfigError("kernel", "the compiled chain kernel was not built in this install")
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
        self.kernel = kernel is not False and KERNEL_AVAILABLE and block_size <= _KERNEL_MAX_BLOCK
        """Whether the compiled kernel hashes chains without extra keys."""

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
        value = parent or self.none_hash
        if per_block is None and self.kernel:
            raw = _native.keys(u32, bs, _native.MODE_CBOR_INT, value)
            chained: list[int] = np.frombuffer(raw, dtype=np.uint64).tolist()
            return chained
        trail: bytes | list[bytes] = b"\xf6"
        if per_block is not None:
            trail = []
            for keys in per_block:
                parts: list[bytes] = []
                _cbor_encode(keys, parts)
                trail.append(b"".join(parts))
        data, ends = _encode_blocks(u32, bs, True, _cbor_head(4, bs), trail)
        out: list[int] = []
        start = 0
        for end in ends:
            value = _low64_sha256(b"\x83" + _cbor_head(0, value) + data[start:end])
            out.append(value)
            start = end
        return out


def _low64_sha256(data: bytes) -> int:
    return int.from_bytes(hashlib.sha256(data).digest()[-8:], "big")


def _kernel(kernel: Callable[..., Any], tokens: TokenIds, *args: object) -> Any:
    """Run a chain kernel on ``tokens`` as they are when it reads that form, else validated.

    The kernel reads lists and tuples of ints and native integer buffers, and refuses other
    forms or ids outside [0, 2**32) (TypeError/ValueError/BufferError, before any work): then
    `_as_u32` converts the tokens, or raises the error that names the bad one.
    """
    if type(tokens) is list or type(tokens) is tuple or isinstance(tokens, array | np.ndarray):
        try:
            return kernel(tokens, *args)
        except (TypeError, ValueError, OverflowError, BufferError):
            pass
    return kernel(_as_u32(tokens), *args)
