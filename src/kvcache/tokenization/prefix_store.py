"""Reuse the tokens of prompt prefixes without ever changing the result.

A prompt is only cut right before an added token (``<|im_start|>``, ``<|eot_id|>``...) that the
Rust tokenizer matches on the raw text, at a position no other added token straddles. The Rust
tokenizer extracts added tokens first and then normalises, pre-tokenises and runs the model on
every piece between them independently, so at such a cut the tokens left of it are those of the
same pieces in any other prompt sharing that text, and the text right of it tokenizes alone
exactly as it does in place. Prompts are stored as a chain of segments between cuts, keyed by
(parent segment id, exact segment text): a hit is an exact text match, never a hash guess.
Every cut is re-checked on the prompt being tokenized, and the tail is tokenized fresh.
docs/tokenization.md gives the full argument; tests/property/test_prefix_store.py checks it.
"""

from __future__ import annotations

import itertools
import re
import sys
import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from kvcache.tokenization.loader import LoadedTokenizer

# Dict and tuple overhead per entry, measured roughly on CPython 3.11.
_ENTRY_OVERHEAD = 200


@dataclass(slots=True)
class _Entry:
    ident: int
    tokens: array[int]
    cost: int


@dataclass(frozen=True, slots=True)
class _Matcher:
    """Per-tokenizer helpers: where cuts may go and which added tokens could straddle one."""

    candidates: re.Pattern[str]
    longest_at: re.Pattern[str]
    first_chars: frozenset[str]
    reach: int
    raw_ids: frozenset[int]
    unsafe_at_cut: frozenset[str]


def _matcher(tokenizer: LoadedTokenizer) -> _Matcher | None:
    boundaries = tokenizer.boundaries
    if boundaries.pattern is None:
        return None
    added: dict[int, Any] = tokenizer.backend.get_added_tokens_decoder()
    raw = {tid: tok for tid, tok in added.items() if not tok.normalized and tok.content}
    contents = sorted({tok.content for tok in raw.values()}, key=lambda t: (-len(t), t))
    return _Matcher(
        candidates=boundaries.pattern,
        longest_at=re.compile("|".join(re.escape(text) for text in contents)),
        first_chars=frozenset(text[0] for text in contents),
        reach=max(len(text) for text in contents),
        raw_ids=frozenset(raw),
        unsafe_at_cut=frozenset(
            tok.content for tok in raw.values() if tok.lstrip or tok.single_word
        ),
    )


def _is_cut(matcher: _Matcher, text: str, cut: int) -> bool:
    """True if an added token starts at ``cut`` and no raw added token occurrence spans it.

    Then the Rust matcher (leftmost-longest) makes the same choices left of ``cut`` as on
    ``text[:cut]`` and restarts at ``cut`` exactly as on ``text[cut:]``.
    """
    at_cut = matcher.longest_at.match(text, cut)
    if at_cut is None or at_cut.group() in matcher.unsafe_at_cut:
        return False
    first = matcher.first_chars
    match = matcher.longest_at.match
    for start in range(max(0, cut - matcher.reach + 1), cut):
        if text[start] in first:
            found = match(text, start)
            if found is not None and found.end() > cut:
                return False
    return True


class PrefixStore:
    """An LRU of prompt segments and their tokens, bounded in bytes, shared by all tokenizers.

    ``encode_bare(tokenizer, text)`` returns exactly ``tokenizer.encode_bare(text).ids``.
    """

    def __init__(self, budget_bytes: int = 256 * 1024 * 1024) -> None:
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[tuple[int, int, str, str], _Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._matchers: dict[int, _Matcher | None] = {}
        self.hits = 0
        self.misses = 0
        self.reused_tokens = 0
        self.fresh_tokens = 0
        self.verify_failures = 0

    def _matcher_for(self, tokenizer: LoadedTokenizer) -> _Matcher | None:
        uid = tokenizer.uid
        if uid not in self._matchers:
            self._matchers[uid] = _matcher(tokenizer)
        return self._matchers[uid]

    def encode_bare(self, tokenizer: LoadedTokenizer, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens, reusing stored prefixes."""
        matcher = self._matcher_for(tokenizer) if self.budget_bytes else None
        if matcher is None or not text:
            ids: list[int] = tokenizer.encode_bare(text).ids
            return ids
        uid = tokenizer.uid
        cuts = [m.start() for m in matcher.candidates.finditer(text) if m.start() > 0]
        reused = array("I")
        parent = 0
        start = 0
        walked = 0
        with self._lock:
            for cut in cuts:
                key = (uid, parent, text[start:cut], text[cut])
                entry = self._entries.get(key)
                if entry is None or not _is_cut(matcher, text, cut):
                    break
                self._entries.move_to_end(key)
                reused.extend(entry.tokens)
                parent = entry.ident
                start = cut
                walked += 1
        tail = tokenizer.encode_bare(text[start:])
        tail_ids: list[int] = tail.ids
        offsets: list[tuple[int, int]] = tail.offsets
        if start and not (tail_ids and offsets[0][0] == 0 and tail_ids[0] in matcher.raw_ids):
            # Cannot happen if the argument holds; never return tokens that might differ.
            self.verify_failures += 1
            fresh: list[int] = tokenizer.encode_bare(text).ids
            return fresh
        if start:
            self.hits += 1
        else:
            self.misses += 1
        self.reused_tokens += len(reused)
        self.fresh_tokens += len(tail_ids)
        self._insert(
            matcher,
            uid,
            text,
            cuts=cuts[walked:],
            start=start,
            parent=parent,
            ids=tail_ids,
            offsets=offsets,
        )
        if not start:
            return tail_ids
        result = reused.tolist()
        result.extend(tail_ids)
        return result

    def _insert(
        self,
        matcher: _Matcher,
        uid: int,
        text: str,
        *,
        cuts: list[int],
        start: int,
        parent: int,
        ids: list[int],
        offsets: list[tuple[int, int]],
    ) -> None:
        """Store the segments of the freshly tokenized tail up to its last verified cut."""
        if not cuts:
            return
        starts = {
            offset[0]: index
            for index, (token, offset) in enumerate(zip(ids, offsets, strict=True))
            if token in matcher.raw_ids
        }
        first_token = 0
        segment_start = start
        new: list[tuple[tuple[int, int, str, str], array[int], int]] = []
        for cut in cuts:
            index = starts.get(cut - start)
            if index is None or not _is_cut(matcher, text, cut):
                break
            segment = text[segment_start:cut]
            tokens = array("I", ids[first_token:index])
            cost = sys.getsizeof(segment) + tokens.itemsize * len(tokens) + _ENTRY_OVERHEAD
            new.append(((uid, parent, segment, text[cut]), tokens, cost))
            first_token = index
            segment_start = cut
            # The parent of the next segment is this one: ids are assigned under the lock.
            parent = -len(new)
        if not new:
            return
        with self._lock:
            resolved: list[int] = []
            for pending, tokens, cost in new:
                key = pending
                if pending[1] < 0:
                    key = (pending[0], resolved[-pending[1] - 1], pending[2], pending[3])
                existing = self._entries.get(key)
                if existing is not None:
                    self._entries.move_to_end(key)
                    resolved.append(existing.ident)
                    continue
                entry = _Entry(next(self._ids), tokens, cost)
                self._entries[key] = entry
                self._bytes += cost
                resolved.append(entry.ident)
            while self._bytes > self.budget_bytes and self._entries:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.cost

    def clear(self) -> None:
        """Drop every stored segment."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def statistics(self) -> dict[str, int]:
        """Entry count, bytes used and reuse counters."""
        with self._lock:
            return {
                "entries": len(self._entries),
                "bytes": self._bytes,
                "budget_bytes": self.budget_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "reused_tokens": self.reused_tokens,
                "fresh_tokens": self.fresh_tokens,
                "verify_failures": self.verify_failures,
            }
