"""Decoded events -> index operations, per pod, with the identity fast path and its checks.

A pod whose published hashes our key scheme reproduces is indexed by those hashes directly
(identity mode): a BlockStored costs one index add, no hashing. Identity is established, and
re-checked on a sample, by recomputing an event's keys from its token ids. A pod that does not
match (another algorithm, seed or block size, SGLang) falls back to dual keys: request keys are
computed from the event's tokens and an engine -> request map resolves parents and removals.

One `EventApplier` serves one ingest shard: every pod is applied by exactly one shard, in
arrival order, so per-pod state needs no lock. Nothing here does I/O.
"""

from __future__ import annotations

import enum
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from kvcache.blocks import GPU, KeyType, PodEntry
from kvcache.errors import KVCacheError, UnknownKeyError
from kvcache.events.keychain import KeyChain, detect_scheme
from kvcache.events.schema import (
    CLEAR,
    STORE_RUN,
    TOKENS_OMITTED,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    FrameRejection,
    Message,
    RunsMessage,
)
from kvcache.events.sequence import SequenceTracker, SeqVerdict
from kvcache.hashing import (
    KeyScheme,
)
from kvcache.index.protocol import Index

log = logging.getLogger("kvcache.events")

# In identity mode, re-verify one checkable event in this many.
REVERIFY_EVERY = 64
# In identity mode the decoder may skip token ids (they only serve verification): one message
# in this many still carries them, and its first checkable event is verified. After a restart
# or a gap in the stream (what an engine replaced behind the same address looks like) the next
# message does.
TOKENS_EVERY = 64


# What the pending run of the applier holds.
_STORE, _REMOVE, _DUAL_STORE = 0, 1, 2


class HashMode(enum.Enum):
    """How a pod's events are keyed."""

    UNVERIFIED = "unverified"
    """No checkable event yet; events are indexed by their hashes until one is checked."""
    IDENTITY = "identity"
    """Our scheme reproduces the pod's hashes: its hashes are our keys."""
    DUAL = "dual"
    """Hashes differ: request keys from token ids, engine -> request map for the rest."""


@dataclass
class PodState:
    """Per-pod ingest state (exposed for introspection)."""

    pod: str
    mode: HashMode = HashMode.UNVERIFIED
    verified_events: int = 0
    checkable_seen: int = 0
    messages_without_tokens: int = 0
    """Messages decoded without token ids since the last one with them (identity mode)."""
    verify_next: bool = False
    """Verify the next checkable event (the first of a message that carries tokens again)."""
    matched_scheme: str | None = None
    """In dual mode: the vLLM scheme the pod's hashes do match, when one was found."""
    copies: Counter[tuple[int, PodEntry]] = field(default_factory=Counter)
    """Extra physical copies of a block beyond the first (vLLM can store one hash twice)."""
    entries: dict[tuple[str | None, int | None], PodEntry] = field(default_factory=dict)
    """The pod's entry per (medium, group) as events name them, built once."""

    def entry(self, medium: str | None, group: int | None) -> PodEntry:
        """The index entry of a block on this pod, tier from the event's medium."""
        found = self.entries.get((medium, group))
        if found is None:
            found = self.entries[(medium, group)] = PodEntry(
                self.pod, (medium or GPU).lower(), False, group
            )
        return found


@dataclass
class IngestStats:
    """Monotonic counters of one applier; read by metrics and statistics()."""

    messages: int = 0
    events_applied: Counter[str] = field(default_factory=Counter)
    events_rejected: Counter[str] = field(default_factory=Counter)
    frames_rejected: Counter[str] = field(default_factory=Counter)
    blocks_stored: int = 0
    blocks_removed: int = 0
    clears: int = 0
    gaps: int = 0
    resets: int = 0
    hash_mismatches: int = 0
    duplicates: int = 0
    """Batches delivered twice (same sequence number and timestamp), skipped."""
    blocks_skipped: Counter[str] = field(default_factory=Counter)


def _plain_text(event: BlockStored) -> bool:
    """No LoRA name and no extra keys: the event's keys follow from its tokens alone."""
    extra = event.extra_keys
    return not event.lora_name and (extra is None or extra.count(None) == len(extra))


class EventApplier:
    """Applies decoded messages of the pods of one shard to the index."""

    def __init__(
        self,
        index: Index,
        scheme: KeyScheme,
        *,
        dp_rank_in_pod_id: bool = False,
        on_alarm: Callable[[str, str], None] | None = None,
    ) -> None:
        self.index = index
        self.scheme = scheme
        self.dp_rank_in_pod_id = dp_rank_in_pod_id
        self.pods: dict[str, PodState] = {}
        self.sequences = SequenceTracker()
        self.stats = IngestStats()
        self._chain = KeyChain(scheme)
        self._on_alarm = on_alarm
        # The run of consecutive same-kind operations of one pod and entry not yet applied:
        # stores (identity mode), removals, or stores with engine keys (dual mode, their
        # engine -> request pairs also kept to resolve parents named later in the message),
        # applied with one index call each.
        self._pending: list[int] = []
        self._pending_kind = _STORE
        self._pending_state: PodState | None = None
        self._pending_entry: PodEntry | None = None
        self._pending_engine: list[int] = []
        self._pending_map: dict[int, int] = {}

    # -- entry points -------------------------------------------------------------------------

    def apply(self, message: Message | RunsMessage | FrameRejection) -> None:
        """Apply one decoded ZMQ message (or count a rejected one)."""
        try:
            self._apply(message)
        finally:
            # Counted once applied: a reader that sees the count (metrics, a caller waiting
            # for ingest to catch up) must also see the message's effect on the index.
            self.stats.messages += 1

    def _apply(self, message: Message | RunsMessage | FrameRejection) -> None:
        stats = self.stats
        if isinstance(message, RunsMessage):
            # Decoded so only for a pod in identity mode, never with dp_rank_in_pod_id (see
            # skip_tokens_for): the pod is the publisher.
            pod = message.pod
            if not self._observe_seq(pod, message.dp_rank, message.seq, pod, message.ts):
                self._apply_runs(message)
            return
        if isinstance(message, FrameRejection):
            stats.frames_rejected[message.reason] += 1
            log.warning(
                "skipped a message: %s (%s) pod=%s seq=%s",
                message.reason,
                message.detail,
                message.pod,
                message.seq,
                extra={"pod": message.pod, "seq": message.seq},
            )
            if message.pod is not None and message.seq is not None:
                # The sequence number still counts: a later message must not look like a gap.
                self._observe_seq(message.pod, None, message.seq, message.pod)
            return
        batch = message.batch
        pod = message.pod
        if self.dp_rank_in_pod_id and batch.dp_rank is not None:
            pod = f"{pod}@dp{batch.dp_rank}"
        if self._observe_seq(message.pod, batch.dp_rank, message.seq, pod, batch.ts):
            return  # the same batch again: applied already
        for rejection in batch.rejected:
            stats.events_rejected[rejection.reason] += 1
            log.warning(
                "skipped event %d of pod=%s seq=%d: %s (%s)",
                rejection.index,
                pod,
                message.seq,
                rejection.reason,
                rejection.detail,
                extra={"pod": pod, "seq": message.seq, "event": rejection.index},
            )
        state = self.pods.get(pod)
        if state is None:
            state = self.pods[pod] = PodState(pod)
        model = message.model or ""
        stored = 0
        removed = batch.merged  # removals the decoder folded into one event still count
        # While a removal run is open (engines send one BlockRemoved per block, back to back),
        # a removal of the same medium and group only extends it: the hot path of the loop.
        run: list[int] | None = None
        run_medium: str | None = None
        run_group: int | None = None
        for event in batch.events:
            try:
                if type(event) is BlockRemoved:
                    removed += 1
                    if (
                        run is not None
                        and event.medium == run_medium
                        and event.group_idx == run_group
                    ):
                        run.extend(event.block_hashes)
                        continue
                    self._removed(state, event)
                    run, run_medium, run_group = self._pending, event.medium, event.group_idx
                    continue
                run = None  # anything else may apply the run
                if type(event) is BlockStored:
                    self._stored(state, event, model)
                    stored += 1
                elif type(event) is AllBlocksCleared:
                    self._flush()
                    self._clear(state)
                    stats.events_applied["AllBlocksCleared"] += 1
            except KVCacheError as exc:
                # Input the decoder let through but the index or hashing refuses (e.g. a token
                # id beyond u32): that event only.
                run = None
                self._reject_unapplicable(pod, message.seq, exc)
        try:
            self._flush()
        except KVCacheError as exc:
            self._reject_unapplicable(pod, message.seq, exc)
        if stored:
            stats.events_applied["BlockStored"] += stored
        if removed:
            stats.events_applied["BlockRemoved"] += removed

    def _apply_runs(self, message: RunsMessage) -> None:
        """An identity-mode message as runs of keys: one index call per run, no events."""
        stats = self.stats
        pod = message.pod
        state = self.pods.get(pod)
        if state is None:  # pragma: no cover - only pods in identity mode are decoded so
            state = self.pods[pod] = PodState(pod)
        for kind, medium, group, keys, repeats in message.runs:
            try:
                if kind == CLEAR:
                    self._clear(state)
                    stats.events_applied["AllBlocksCleared"] += 1
                    continue
                # the index takes u64 arrays as they are (Sequence[int] by the protocol)
                array = cast("Sequence[int]", np.frombuffer(cast(bytes, keys), dtype=np.uint64))
                entry = state.entry(medium, group)
                if kind != STORE_RUN:
                    self._evict_run(state, entry, array)
                elif state.mode is HashMode.IDENTITY:
                    self._add_run(state, entry, array, repeats)
                else:  # pragma: no cover - the decision and the apply run under one lock
                    stats.blocks_skipped["tokens_omitted"] += len(array)
            except KVCacheError as exc:
                self._reject_unapplicable(pod, message.seq, exc)
        if message.stored_events:
            stats.events_applied["BlockStored"] += message.stored_events
        if message.removed_events:
            stats.events_applied["BlockRemoved"] += message.removed_events

    def _reject_unapplicable(self, pod: str, seq: int, exc: KVCacheError) -> None:
        self._pending, self._pending_engine, self._pending_map = [], [], {}
        self.stats.events_rejected["unapplicable"] += 1
        log.warning(
            "event of pod=%s seq=%d not applied: %s", pod, seq, exc, extra={"pod": pod, "seq": seq}
        )

    def skip_tokens_for(self, pod: str) -> bool:
        """Whether the next message of ``pod`` (by its topic) may be decoded without token ids.

        Only for pods in identity mode, whose keys need no tokens; one message in
        `TOKENS_EVERY` keeps them, and its first checkable event is verified, so identity is
        still re-checked about as often as with one event in `REVERIFY_EVERY`.
        """
        if self.dp_rank_in_pod_id:
            return False  # the state is per rank, the topic names the publisher
        state = self.pods.get(pod)
        if state is None or state.mode is not HashMode.IDENTITY:
            return False
        state.messages_without_tokens += 1
        if state.messages_without_tokens < TOKENS_EVERY:
            return True
        state.messages_without_tokens = 0
        state.verify_next = True
        return False

    def forget_pod(self, pod: str) -> int:
        """Drop everything about a pod (it left the fleet); returns entries removed."""
        self.pods.pop(pod, None)
        self.sequences.forget(pod)
        return self.index.clear(pod)

    # -- sequence -----------------------------------------------------------------------------

    def _observe_seq(
        self, publisher: str, rank: int | None, seq: int, pod: str, ts: float | None = None
    ) -> bool:
        """Track the stream's sequence; True when the batch is a duplicate to skip."""
        verdict = self.sequences.observe(publisher, rank, seq, ts)
        if verdict is SeqVerdict.DUPLICATE:
            self.stats.duplicates += 1
            return True
        if verdict is SeqVerdict.GAP:
            self.stats.gaps += 1
            self._verify_next_message(pod)
            gap = self.sequences.streams[(publisher, rank)].last_gap
            log.warning(
                "pod=%s rank=%s lost batches %s..%s: the index may miss blocks of this pod",
                publisher,
                rank,
                *(gap or (None, None)),
                extra={"pod": publisher, "rank": rank, "missing": gap},
            )
        elif verdict is SeqVerdict.RESET:
            self.stats.resets += 1
            removed = self.index.clear(pod)
            state = self.pods.get(pod)
            if state is not None:
                state.copies.clear()
            self._verify_next_message(pod)  # a restarted engine may hash differently
            log.warning(
                "pod=%s rank=%s restarted (seq went back to %d): cleared %d stale entries",
                publisher,
                rank,
                seq,
                removed,
                extra={"pod": publisher, "rank": rank, "seq": seq, "cleared": removed},
            )
        return False

    def _verify_next_message(self, pod: str) -> None:
        """The pod's next message carries its token ids and is verified (see skip_tokens_for)."""
        state = self.pods.get(pod)
        if state is not None:
            state.messages_without_tokens = TOKENS_EVERY - 1

    # -- BlockStored --------------------------------------------------------------------------

    def _stored(self, state: PodState, event: BlockStored, model: str) -> None:
        hashes = event.block_hashes
        if not hashes:
            return
        entry = state.entry(event.medium, event.group_idx)
        tokens = event.token_ids
        if tokens is TOKENS_OMITTED:
            # the decoder skipped the tokens because the pod was in identity mode (see
            # skip_tokens_for), and the mode changes only while applying: it still is
            if state.mode is HashMode.IDENTITY:
                self._coalesce(state, entry, hashes, _STORE)
            else:  # pragma: no cover - the decision and the apply run under one lock
                self.stats.blocks_skipped["tokens_omitted"] += len(hashes)
            return
        if not tokens:
            self._flush()
            self._tier_update(state, hashes, entry)
            return
        if state.mode is not HashMode.DUAL and self._checkable(event):
            state.checkable_seen += 1
            if (
                state.mode is HashMode.UNVERIFIED
                or state.verify_next
                or state.checkable_seen % REVERIFY_EVERY == 0
            ):
                state.verify_next = False
                self._flush()  # a mismatch clears the pod: earlier stores must land first
                self._verify(state, event, model)
        if state.mode is HashMode.DUAL:
            self._stored_dual(state, event, entry, model)
            return
        # Identity: the hashes are our keys. Consecutive stores of the same pod and entry are
        # coalesced into one index add.
        self._coalesce(state, entry, hashes, _STORE)

    def _coalesce(self, state: PodState, entry: PodEntry, keys: Sequence[int], kind: int) -> None:
        """Queue keys onto the pending run, applying the run first if this one differs."""
        if self._pending and (
            self._pending_kind != kind
            or self._pending_state is not state
            or self._pending_entry != entry
        ):
            self._flush()
        self._pending.extend(keys)
        self._pending_kind = kind
        self._pending_state = state
        self._pending_entry = entry

    def _flush(self) -> None:
        """Apply the pending run: one index add (stores) or one evict_many (removals)."""
        keys = self._pending
        if not keys:
            return
        state, entry = self._pending_state, self._pending_entry
        assert state is not None and entry is not None
        self._pending = []
        if self._pending_kind == _REMOVE:
            self._evict_run(state, entry, keys)
        elif self._pending_kind == _STORE:
            self._add_run(state, entry, keys, len(set(keys)) != len(keys))
        else:
            engine, self._pending_engine, self._pending_map = self._pending_engine, [], {}
            self._add_dual_run(state, entry, engine, keys)

    def _add_run(
        self, state: PodState, entry: PodEntry, keys: Sequence[int], repeats: bool
    ) -> None:
        """Index a run of stored keys (identity mode); ``repeats``: some key occurs twice."""
        self.stats.blocks_stored += len(keys)
        copies = state.copies
        if repeats:
            # The same block stored twice within one message: the second is another copy.
            counts = Counter(keys.tolist() if isinstance(keys, np.ndarray) else keys)
            for key, count in counts.items():
                if count > 1:
                    copies[(key, entry)] += count - 1
            keys = list(counts)
        for key in self.index.add(None, keys, (entry,)):
            copies[(key, entry)] += 1

    def _checkable(self, event: BlockStored) -> bool:
        """Whether recomputing this event's keys from its tokens is a fair test of identity.

        Events with LoRA or extra keys are never used: vLLM >= 0.31 leaves the LoRA path, which
        it hashes, out of the event. A block-size mismatch is checkable (it never matches).
        """
        if event.lora_id is not None or not _plain_text(event):
            return False
        if event.block_size and event.block_size != self.scheme.block_size:
            return True
        if len(event.token_ids) != len(event.block_hashes) * self.scheme.block_size:
            return False
        return event.parent_block_hash is None or event.parent_block_hash in self._chain.states

    def _verify(self, state: PodState, event: BlockStored, model: str) -> None:
        matches = event.block_size in (0, self.scheme.block_size)
        if matches:
            keys = self._chain.extend(event.token_ids, event.parent_block_hash, model)
            matches = keys is not None and keys == list(event.block_hashes)
        if matches:
            state.verified_events += 1
            if state.mode is HashMode.UNVERIFIED:
                state.mode = HashMode.IDENTITY
                log.info(
                    "pod=%s publishes %s keys: identity mode",
                    state.pod,
                    self.scheme.name,
                    extra={"pod": state.pod, "scheme": self.scheme.name},
                )
            return
        self.stats.hash_mismatches += 1
        state.matched_scheme = detect_scheme(event, self.scheme)
        previous = state.mode
        state.mode = HashMode.DUAL
        # Whatever was indexed under this pod's hashes lives in another key space: drop it.
        self.index.clear(state.pod)
        state.copies.clear()
        message = (
            f"pod={state.pod} publishes block hashes that {self.scheme!r} does not reproduce"
            + (
                f"; they match vLLM {state.matched_scheme}"
                if state.matched_scheme
                else "; no known vLLM scheme matches (random seed? other block size?)"
            )
            + f" (event block_size={event.block_size}). Falling back to dual keys"
            + (" after identity mode." if previous is HashMode.IDENTITY else ".")
            + " Configure hashing.scheme/seed/block_size to match the engine for the fast path."
        )
        log.warning("%s", message, extra={"pod": state.pod, "matched_scheme": state.matched_scheme})
        if self._on_alarm is not None:
            self._on_alarm(state.pod, message)

    def _stored_dual(
        self, state: PodState, event: BlockStored, entry: PodEntry, model: str
    ) -> None:
        if not _plain_text(event):
            self.stats.blocks_skipped["extra_keys_unsupported"] += len(event.block_hashes)
            return
        parent_key: int | None = None
        parent = event.parent_block_hash
        if parent is not None:
            # A parent stored earlier in this message may still be in the pending run.
            parent_key = self._pending_map.get(parent)
            if parent_key is None:
                try:
                    parent_key = self.index.request_key(parent)
                except UnknownKeyError:
                    self.stats.blocks_skipped["parent_unknown"] += len(event.block_hashes)
                    return
        size = self.scheme.block_size
        usable = len(event.token_ids) // size * size
        if usable == 0:
            self.stats.blocks_skipped["partial_block"] += len(event.block_hashes)
            return
        keys = self._chain.extend(event.token_ids[:usable], parent_key, event.lora_name or model)
        if keys is None:
            self.stats.blocks_skipped["parent_unknown"] += len(event.block_hashes)
            return
        if len(keys) == len(event.block_hashes):
            # One engine key per request key: consecutive such stores of the pod and entry
            # become one index add (the engine -> request map is per position).
            self._coalesce(state, entry, keys, _DUAL_STORE)
            self._pending_engine.extend(event.block_hashes)
            self._pending_map.update(zip(event.block_hashes, keys, strict=True))
            return
        self._flush()  # block sizes differ: many-to-one or one-to-many, one add per event
        self.index.add(event.block_hashes, keys, (entry,))
        self.stats.blocks_stored += len(event.block_hashes)

    def _add_dual_run(
        self, state: PodState, entry: PodEntry, engine: list[int], keys: list[int]
    ) -> None:
        """Index a run of dual-mode stores, engine key i mapped to request key i."""
        self.stats.blocks_stored += len(engine)
        held = self.index.add(engine, keys, (entry,))
        if held or len(set(keys)) != len(keys):
            # A block held before this add, or stored twice within it, is another physical
            # copy; removals name engine keys, so the copies are counted under those.
            again = set(held)
            seen: set[int] = set()
            for engine_key, key in zip(engine, keys, strict=True):
                if key in again or key in seen:
                    state.copies[(engine_key, entry)] += 1
                seen.add(key)

    def _tier_update(self, state: PodState, hashes: Sequence[int], entry: PodEntry) -> None:
        """A store without tokens (offload tiers): only blocks we already know gain the tier."""
        if state.mode is HashMode.DUAL:
            resolved: list[int] = []
            for engine_key in hashes:
                try:
                    resolved.append(self.index.request_key(engine_key))
                except UnknownKeyError:
                    self.stats.blocks_skipped["tier_update_unknown"] += 1
            keys: Sequence[int] = list(dict.fromkeys(resolved))
        else:
            keys = hashes
        if keys:
            self.index.add(None, keys, (entry,))
            self.stats.blocks_stored += len(keys)

    # -- BlockRemoved / AllBlocksCleared ------------------------------------------------------

    def _removed(self, state: PodState, event: BlockRemoved) -> None:
        # Engines send one BlockRemoved per block: consecutive ones are applied as one run.
        self._coalesce(
            state, state.entry(event.medium, event.group_idx), event.block_hashes, _REMOVE
        )

    def _evict_run(self, state: PodState, entry: PodEntry, keys: Sequence[int]) -> None:
        self.stats.blocks_removed += len(keys)
        copies = state.copies
        if copies:
            kept = []
            for key in keys.tolist() if isinstance(keys, np.ndarray) else keys:
                held = copies.get((key, entry), 0)
                if held:
                    # Another physical copy of the same block is still resident on the pod.
                    if held == 1:
                        del copies[(key, entry)]
                    else:
                        copies[(key, entry)] = held - 1
                    continue
                kept.append(key)
            keys = kept
        key_type = KeyType.ENGINE if state.mode is HashMode.DUAL else KeyType.REQUEST
        if len(keys):
            self.index.evict_many(keys, key_type, (entry,))

    def _clear(self, state: PodState) -> None:
        self.index.clear(state.pod)
        state.copies.clear()
        self.stats.clears += 1
