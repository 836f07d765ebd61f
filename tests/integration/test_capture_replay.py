"""Replay real vLLM 0.32 captures through the write path and check what kvcache then predicts.

The captures hold, for every request, the `num_cached_tokens` vLLM reported. Before each
request's events are applied, kvcache's predicted cached tokens for the pod must equal it, with
two of vLLM's own rules an outside observer cannot see accounted for explicitly:

* vLLM always recomputes the last prompt token, so at most ``(len(prompt) - 1) // bs`` blocks
  count as cached;
* ``reset_prefix_cache`` publishes AllBlocksCleared only with the engine's next step, so the
  request right after a reset is predicted from an empty cache.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvcache.config import Config
from kvcache.events.apply import EventApplier, HashMode
from kvcache.events.decode import decode_frames
from kvcache.events.schema import BlockRemoved, BlockStored, Message
from kvcache.indexer import Indexer

CAPTURES = Path(__file__).resolve().parents[1] / "data" / "captures"
POD = "pod-a"
BLOCK_SIZE = 32


def _frames(folder: str) -> list[list[bytes]]:
    lines = (CAPTURES / folder / "frames.jsonl").read_text().splitlines()
    return [[bytes.fromhex(f) for f in json.loads(line)["frames_hex"]] for line in lines]


def _requests(folder: str) -> Iterator[dict[str, Any]]:
    for line in (CAPTURES / folder / "requests.jsonl").read_text().splitlines():
        yield json.loads(line)


def predicted_cached_tokens(indexer: Indexer, prompt: list[int]) -> int:
    """What vLLM will report as cached for this prompt, given kvcache's view of the pod."""
    blocks = int(indexer.score_tokens(prompt, pods=[POD]).get(POD, 0.0))
    return min(blocks, (len(prompt) - 1) // BLOCK_SIZE) * BLOCK_SIZE


class _Replay:
    """Applies captured frames and tracks the block set the events describe (the oracle)."""

    def __init__(self, scheme: str, seed: str | None) -> None:
        config = Config.from_mapping(
            {"hashing": {"scheme": scheme, "seed": seed, "block_size": BLOCK_SIZE}}
        )
        self.indexer = Indexer(config)
        self.applier = EventApplier(self.indexer.index, self.indexer.scheme)
        self.resident: dict[int, int] = {}  # hash -> physical copies, from the events alone

    def apply(self, frames: list[bytes]) -> None:
        message = decode_frames(frames)
        assert isinstance(message, Message)
        assert not message.batch.rejected
        for event in message.batch.events:
            if isinstance(event, BlockStored):
                for key in event.block_hashes:
                    self.resident[key] = self.resident.get(key, 0) + 1
            elif isinstance(event, BlockRemoved):
                for key in event.block_hashes:
                    self.resident[key] -= 1
                    if not self.resident[key]:
                        del self.resident[key]
            else:
                self.resident.clear()
        self.applier.apply(message)

    def indexed_blocks(self) -> set[int]:
        keys = list(self.resident)
        found = set()
        for key in keys:
            if self.indexer.index.lookup([key]):
                found.add(key)
        return found


def test_pickle_default_capture_predictions_match_vllm() -> None:
    folder = "vllm-0.32-sha256-pickle-default"
    frames = _frames(folder)
    replay = _Replay("sha256", None)
    applied = 0
    reset_pending = False
    checked = 0
    steps: dict[int, list[dict[str, Any]]] = {}
    for request in _requests(folder):
        steps.setdefault(request["step"], []).append(request)
    for step in sorted(steps):
        batch = steps[step]
        if batch[0]["kind"] == "reset_prefix_cache":
            reset_pending = True
            continue
        # Requests batched into one call are all predicted before that call's events.
        for request in batch:
            prompt = request["prompt_token_ids"]
            predicted = 0 if reset_pending else predicted_cached_tokens(replay.indexer, prompt)
            assert predicted == request["num_cached_tokens"], request["label"]
            checked += 1
        reset_pending = False
        start, end = batch[0]["events_capture_range"]
        for number in range(max(applied, start), end):
            replay.apply(frames[number])
        applied = max(applied, end)
        # After the request: the pod's indexed blocks are exactly those stored minus removed.
        assert replay.indexed_blocks() == set(replay.resident)
    assert checked == 21
    assert applied == len(frames) == 26
    state = replay.applier.pods[POD]
    assert state.mode is HashMode.IDENTITY
    assert replay.applier.stats.hash_mismatches == 0
    assert replay.applier.stats.events_applied == {
        "BlockStored": 25,
        "BlockRemoved": 32,
        "AllBlocksCleared": 1,
    }


def test_duplicate_store_keeps_block_until_its_last_copy_is_removed() -> None:
    folder = "vllm-0.32-sha256-pickle-default"
    replay = _Replay("sha256", None)
    most_copies = 0
    for frames in _frames(folder):
        replay.apply(frames)
        most_copies = max(most_copies, *replay.resident.values(), 0)
        # Checked after every message, including the one removing the first of two copies.
        assert replay.indexed_blocks() == set(replay.resident)
    assert most_copies == 2  # the capture really has a block stored twice


def test_serve_capture_sha256_cbor_seed0_identity_and_reset() -> None:
    folder = "vllm-0.32-serve-sha256cbor"
    frames = _frames(folder)
    replay = _Replay("sha256_cbor", "0")
    requests = list(_requests(folder))
    first = requests[0]["response"]["choices"][0]
    replay.apply(frames[0])
    assert replay.applier.pods[POD].mode is HashMode.IDENTITY
    tokens = first["prompt_token_ids"] + first["token_ids"]
    assert replay.indexer.score_tokens(tokens) == {POD: 2.0}
    replay.apply(frames[1])  # [AllBlocksCleared, BlockStored of the post-reset request]
    after = json.loads((CAPTURES / folder / "after_reset_response.json").read_text())
    choice = after["choices"][0]
    assert replay.indexer.score_tokens(choice["prompt_token_ids"] + choice["token_ids"]) == {
        POD: 2.0
    }
    after_tokens = choice["prompt_token_ids"] + choice["token_ids"]
    shared = 0
    while tokens[: (shared + 1) * BLOCK_SIZE] == after_tokens[: (shared + 1) * BLOCK_SIZE]:
        shared += 1
    # The first request's own blocks were cleared; only what the new request re-stored remains.
    assert shared < 2
    assert replay.indexer.score_tokens(tokens) == ({POD: float(shared)} if shared else {})
    assert replay.applier.stats.clears == 1


@pytest.mark.parametrize(("scheme", "seed"), [("sha256_cbor", "0"), ("sha256", "42")])
def test_other_scheme_raises_alarm_names_the_real_one_and_falls_back(
    scheme: str, seed: str, caplog: pytest.LogCaptureFixture
) -> None:
    folder = "vllm-0.32-sha256-pickle-default"
    replay = _Replay(scheme, seed)
    frames = _frames(folder)
    for message in frames[:12]:
        replay.apply(message)
    state = replay.applier.pods[POD]
    assert state.mode is HashMode.DUAL
    assert state.matched_scheme is not None
    assert "sha256 with seed 'vllm-none-hash'" in state.matched_scheme
    assert replay.applier.stats.hash_mismatches == 1
    alarms = [r for r in caplog.records if "does not reproduce" in r.getMessage()]
    assert len(alarms) == 1
    # Dual keys: scoring with the configured scheme still finds the blocks.
    request = next(_requests(folder))
    prompt = request["prompt_token_ids"]
    assert replay.indexer.score_tokens(prompt).get(POD, 0) >= 5
