"""One simulated vLLM pod: vLLM v1's prefix-cache block pool, and the KV events it publishes.

The model follows vLLM's ``BlockPool`` / ``KVCacheManager`` for one full-attention group, close
enough that the same requests give the same events as a real vLLM 0.32 (checked against the
real captures in ``tests/data/captures``; docs/sim-engine.md lists what is and is not modelled):

* ``num_blocks`` is vLLM's ``num_gpu_blocks``; block 0 is the null block, so ``num_blocks - 1``
  hold KV. Free blocks sit in a queue (vLLM's ``FreeKVCacheBlockQueue``): new blocks come off
  the head, so the head is the eviction order. Initially the queue is blocks 1..n-1 in order.
* A request first looks up its prompt's full blocks in the prefix cache, stopping at the first
  miss and never counting the block of the last prompt token (vLLM always recomputes that
  token): at most ``(len(prompt) - 1) // block_size`` blocks hit. Hit blocks are referenced and
  taken off the free queue *before* new blocks are allocated, so a request never evicts its own
  prefix.
* A new block taken off the free queue that still has a hash loses it: one BlockRemoved per block.
  Every block that becomes full gets its hash (from the `KeyScheme`) and enters the cache: one
  BlockStored per engine step, with the hash of the block before it as the parent. The same hash
  can live in two physical blocks (a recomputed last block), and is then removed twice.
* Decoding fills blocks with generated tokens: the KV of every output token but the last one is
  computed, and each block that fills is stored in its own step. A new block is allocated (maybe
  evicting) when a token starts one.
* A finished request releases its blocks last block first: cached blocks to the free queue's
  *tail* (so the LRU evicts a request's tail before its shared prefix), blocks without a hash
  (a partially filled last block) to its *head*, to be reused before any cached block.
* `preempt` is vLLM's preemption by recompute: the request's blocks are freed as by `finish`
  (its stored blocks stay cached until reused); the scheduler later `start`s it again with its
  prompt and generated tokens, and the lookup hits whatever was not evicted meanwhile.
* `reset` is ``reset_prefix_cache``: refused while requests run; AllBlocksCleared goes out with
  the next engine step. `restart` is a new process: an empty pool, sequence numbers from 0.

Calls are engine steps: `start` is a request's prefill step, `decode` one decode step (False,
nothing changed, when the pool has no block for it), `finish` frees the request after running
the decode steps of the outputs it is given. Each step with events publishes one batch to the
sink, as vLLM's scheduler does.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Final

from kvcache.errors import KVCacheError
from kvcache.events.schema import AllBlocksCleared, BlockRemoved, BlockStored, Event
from kvcache.hashing import KeyScheme
from kvcache.sim.wire import EventSink, SequencedSink

__all__ = ["PoolExhaustedError", "SimEngine"]

_MEDIUM: Final = "GPU"  # vLLM's own cache is "GPU" even on the CPU backend
_KIND: Final = "full_attention"


class PoolExhaustedError(KVCacheError):
    """The request needs more free blocks than the pool has (vLLM would keep it waiting)."""


class _Request:
    __slots__ = ("blocks", "cached_blocks", "fed", "keys", "output", "tokens")

    def __init__(
        self, tokens: list[int], keys: list[int], blocks: list[int], cached: int, output: list[int]
    ) -> None:
        self.tokens = tokens
        """Tokens whose KV is computed (or being computed in this step)."""
        self.keys = keys
        self.output = output
        """The tokens `decode` will feed, in order (the request's future outputs)."""
        self.fed = 0
        """How many of ``output`` have been fed."""
        self.blocks = blocks
        """Physical block ids, in request order."""
        self.cached_blocks = cached
        """How many of the request's leading blocks are in the prefix cache (vLLM's
        ``num_cached_block``)."""


class SimEngine:
    """A vLLM pod's prefix cache: start/finish requests, publish the events vLLM would."""

    def __init__(
        self,
        pod: str,
        *,
        block_size: int,
        num_blocks: int,
        scheme: KeyScheme,
        sink: EventSink | None = None,
    ) -> None:
        if block_size < 1:
            raise KVCacheError(f"block_size must be >= 1, got {block_size}")
        if num_blocks < 2:
            raise KVCacheError(
                f"num_blocks must be >= 2 (block 0 is vLLM's null block), got {num_blocks}"
            )
        if scheme.block_size != block_size:
            raise KVCacheError(
                f"the scheme hashes {scheme.block_size}-token blocks, the engine uses {block_size}"
            )
        self.pod = pod
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.scheme = scheme
        self.sink = sink
        self.blocks_stored = 0
        self.blocks_removed = 0
        self.decode_blocks_skipped = 0
        """Decode blocks `finish` did not allocate because the pool was full (vLLM would
        preempt; `decode` reports it to the caller instead)."""
        self.preemptions = 0
        """Requests preempted (`preempt`)."""
        self._new_pool()

    def _new_pool(self) -> None:
        # block id -> ref count; block id -> hash (cached blocks only)
        self._refs = [0] * self.num_blocks
        self._hash_of: dict[int, int] = {}
        # vLLM's FreeKVCacheBlockQueue: head = next to reuse. Block 0 is the null block.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, self.num_blocks))
        # hash -> physical blocks holding it, in insertion order (vLLM's BlockHashToBlockMap:
        # a lookup takes the first one).
        self._cached: dict[int, dict[int, None]] = {}
        self._requests: dict[str, _Request] = {}
        self._pending: list[Event] = []

    # -- introspection ------------------------------------------------------------------------

    @property
    def capacity_blocks(self) -> int:
        """Blocks that can hold KV (the null block excluded)."""
        return self.num_blocks - 1

    @property
    def free_blocks(self) -> int:
        """Blocks in the free queue (cached-but-unused blocks included, as in vLLM)."""
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        """Blocks referenced by running requests."""
        return self.capacity_blocks - len(self._free)

    @property
    def kv_usage(self) -> float:
        """vLLM's ``kv_cache_usage``: the fraction of blocks in use."""
        return self.used_blocks / self.capacity_blocks

    @property
    def running(self) -> int:
        """Requests started and not finished."""
        return len(self._requests)

    def held_keys(self) -> set[int]:
        """Hashes in the prefix cache right now (what a perfect index holds for this pod)."""
        return set(self._cached)

    def cached_tokens(self, tokens: Sequence[int]) -> int:
        """What vLLM would report as ``num_cached_tokens`` for this prompt right now."""
        return self._hit_blocks(self.scheme.block_keys(tokens), len(tokens)) * self.block_size

    def blocks_needed(self, tokens: Sequence[int]) -> int:
        """New blocks `start` would allocate for this prompt now."""
        keys = self.scheme.block_keys(tokens)
        return self._plan(keys, len(tokens))[1]

    def can_start(self, tokens: Sequence[int]) -> bool:
        """Whether `start` would find enough blocks for this prompt now."""
        _, needed, available = self._plan(self.scheme.block_keys(tokens), len(tokens))
        return needed <= available

    # -- requests -----------------------------------------------------------------------------

    def start(self, request_id: str, tokens: Sequence[int], output: Sequence[int] = ()) -> int:
        """Admit and prefill a request; returns its cached tokens (vLLM's num_cached_tokens).

        ``output`` is what the request will generate, for `decode` to feed step by step. A
        request resumed after `preempt` starts again with its prompt plus the outputs it had
        generated as ``tokens`` (vLLM recomputes them) and the rest as ``output``.

        Raises PoolExhaustedError (nothing changed) when the prompt does not fit, and
        KVCacheError for a request id that is already running.
        """
        if request_id in self._requests:
            raise KVCacheError(f"request {request_id!r} is already running on {self.pod}")
        prompt = list(tokens)
        keys = self.scheme.block_keys(prompt)
        hits, needed, available = self._plan(keys, len(prompt))
        if needed > available:
            raise PoolExhaustedError(
                f"{self.pod}: request {request_id!r} needs {needed} new blocks, "
                f"{available} are free"
            )
        blocks = [next(iter(self._cached[key])) for key in keys[:hits]]
        for block in blocks:  # touch: referenced blocks leave the free queue
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1
        request = _Request(prompt, keys, blocks, hits, list(output))
        self._requests[request_id] = request
        events = self._pending
        self._pending = []
        self._allocate(request, needed, events)
        self._cache_full_blocks(request, len(prompt), events)
        self._publish(events)
        return hits * self.block_size

    def finish(self, request_id: str, output_tokens: Sequence[int] = ()) -> None:
        """Decode ``output_tokens`` (one engine step each), then free the request's blocks.

        The last output token is sampled but never fed back, so its KV is never computed.
        Unknown request ids raise KVCacheError.
        """
        request = self._requests.get(request_id)
        if request is None:
            raise KVCacheError(f"request {request_id!r} is not running on {self.pod}")
        outputs = list(output_tokens)
        bs = self.block_size
        if len(outputs) > 1:
            request.tokens.extend(outputs)
            computed = len(request.tokens) - 1
            if computed // bs > len(request.keys):
                request.keys = self.scheme.block_keys(request.tokens[:computed])
            for position in range(len(request.tokens) - len(outputs), computed):
                events = self._pending
                self._pending = []
                if position // bs >= len(request.blocks):
                    if not self._free:
                        self.decode_blocks_skipped += 1
                        self._publish(events)
                        break  # vLLM would preempt a request; not modelled
                    self._allocate(request, 1, events)
                self._cache_full_blocks(request, position + 1, events)
                self._publish(events)
        del self._requests[request_id]
        self._free_blocks(request)

    def decode(self, request_id: str, count: int = 1) -> bool:
        """One engine step computing the KV of the request's next ``count`` output tokens.

        vLLM's ``allocate_slots`` for a running request: the blocks the new tokens start are
        allocated (evicting cached ones), then the blocks they fill are stored. False, with
        nothing changed, when the free queue cannot supply the blocks (vLLM then preempts).
        The last output token is never fed (it is sampled, never computed): feeding it, or
        an unknown request id, raises KVCacheError.
        """
        request = self._requests.get(request_id)
        if request is None:
            raise KVCacheError(f"request {request_id!r} is not running on {self.pod}")
        if count < 1 or request.fed + count > len(request.output) - 1:
            raise KVCacheError(
                f"request {request_id!r}: cannot feed {count} more of its "
                f"{len(request.output)} output tokens ({request.fed} fed; never the last)"
            )
        bs = self.block_size
        total = len(request.tokens) + count
        needed = -(-total // bs) - len(request.blocks)
        if needed > len(self._free):
            return False
        request.tokens.extend(request.output[request.fed : request.fed + count])
        request.fed += count
        if total // bs > len(request.keys):
            # Chained keys: those of the whole planned sequence start with the prompt's.
            planned = request.tokens + request.output[request.fed : -1]
            request.keys = self.scheme.block_keys(planned)
        events = self._pending
        self._pending = []
        if needed > 0:
            self._allocate(request, needed, events)
        self._cache_full_blocks(request, total, events)
        self._publish(events)
        return True

    def preempt(self, request_id: str) -> None:
        """vLLM's preemption by recompute: the request's blocks are freed as by `finish`.

        Its stored blocks stay in the prefix cache until reused, so a resumed request (`start`
        again) hits whatever of them has not been evicted meanwhile.
        """
        request = self._requests.pop(request_id, None)
        if request is None:
            raise KVCacheError(f"request {request_id!r} is not running on {self.pod}")
        self.preemptions += 1
        self._free_blocks(request)

    def _free_blocks(self, request: _Request) -> None:
        # vLLM frees a request's blocks last block first. Cached ones join the tail (LRU: its
        # tail is evicted before its prefix); blocks without a hash (a partial last block) go
        # to the head, to be reused at once.
        uncached: list[int] = []
        for block in reversed(request.blocks):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._free[block] = None
                else:
                    uncached.append(block)
        for block in reversed(uncached):
            self._free[block] = None
            self._free.move_to_end(block, last=False)

    def reset(self) -> bool:
        """vLLM's ``reset_prefix_cache``: False (nothing done) while requests run.

        AllBlocksCleared is published with the next engine step (`start`, `finish` or `flush`).
        """
        if self._requests:
            return False
        self._cached.clear()
        self._hash_of.clear()
        self._pending.append(AllBlocksCleared())
        return True

    def restart(self) -> None:
        """The engine process restarts: empty pool, no requests, sequence numbers from 0."""
        self._new_pool()
        if isinstance(self.sink, SequencedSink):
            self.sink.restart_sequence()

    def flush(self) -> None:
        """Publish events still waiting for an engine step (vLLM waits for the next request)."""
        events = self._pending
        self._pending = []
        self._publish(events)

    # -- the pool -----------------------------------------------------------------------------

    def _hit_blocks(self, keys: list[int], num_tokens: int) -> int:
        # The last prompt token is always recomputed: its block can never be a hit.
        limit = min(len(keys), (num_tokens - 1) // self.block_size) if num_tokens else 0
        hits = 0
        while hits < limit and keys[hits] in self._cached:
            hits += 1
        return hits

    def _plan(self, keys: list[int], num_tokens: int) -> tuple[int, int, int]:
        """(hit blocks, new blocks needed, blocks available to allocate) for a prompt."""
        hits = self._hit_blocks(keys, num_tokens)
        # Hit blocks sitting in the free queue are taken off it, not allocated (vLLM's
        # get_num_blocks_to_allocate counts them as used).
        free_hits = sum(1 for key in keys[:hits] if self._refs[next(iter(self._cached[key]))] == 0)
        return hits, -(-num_tokens // self.block_size) - hits, len(self._free) - free_hits

    def _allocate(self, request: _Request, count: int, events: list[Event]) -> None:
        for _ in range(count):
            block, _ = self._free.popitem(last=False)
            key = self._hash_of.pop(block, None)
            if key is not None:  # reusing a cached block evicts it
                holders = self._cached[key]
                del holders[block]
                if not holders:
                    del self._cached[key]
                self.blocks_removed += 1
                events.append(BlockRemoved([key], _MEDIUM, group_idx=0))
            self._refs[block] = 1
            request.blocks.append(block)

    def _cache_full_blocks(self, request: _Request, num_tokens: int, events: list[Event]) -> None:
        bs = self.block_size
        first, full = request.cached_blocks, num_tokens // bs
        if full <= first:
            return
        keys = request.keys[first:full]
        for block, key in zip(request.blocks[first:full], keys, strict=True):
            self._hash_of[block] = key
            self._cached.setdefault(key, {})[block] = None
        request.cached_blocks = full
        self.blocks_stored += len(keys)
        events.append(
            BlockStored(
                keys,
                request.keys[first - 1] if first else None,
                request.tokens[first * bs : full * bs],
                bs,
                None,
                _MEDIUM,
                None,
                extra_keys=[None] * len(keys),
                group_idx=0,
                kv_cache_spec_kind=_KIND,
            )
        )

    def _publish(self, events: list[Event]) -> None:
        if events and self.sink is not None:
            self.sink.publish(events)
