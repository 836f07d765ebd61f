"""SimEngine against real vLLM 0.32: the captured requests replayed give the captured events.

The captures (tests/data/captures) hold every request a real vLLM 0.32 engine served, in order,
with the KV events it published. Replaying the same requests through a SimEngine configured like
that engine (block size 32, 24 GPU blocks, the capture's hash algorithm and seed) must give the
same events: same hashes, same parents and tokens, same order, the same evictions. The only
difference is batching inside one `LLM.generate` call with three prompts (step 14): vLLM's
scheduler prefilled the first prompt in one step and the other two together in the next, while
the simulation runs one prefill step per request; the events and their order are the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from kvcache.errors import KVCacheError
from kvcache.events.schema import AllBlocksCleared, BlockRemoved, BlockStored, Event
from kvcache.hashing import VllmScheme, make_scheme
from kvcache.sim.engine import PoolExhaustedError, SimEngine
from kvcache.sim.wire import ListSink

CAPTURES = Path(__file__).resolve().parents[2] / "data" / "captures"
PICKLE = CAPTURES / "vllm-0.32-sha256-pickle-default"
SERVE = CAPTURES / "vllm-0.32-serve-sha256cbor"
_BATCH = msgspec.msgpack.Decoder(tuple[float, list[Event], int])


def captured_batches(folder: Path) -> list[list[Event]]:
    """Each captured message's events, decoded straight from the payload bytes."""
    batches = []
    for line in (folder / "frames.jsonl").read_text().splitlines():
        payload = bytes.fromhex(json.loads(line)["frames_hex"][2])
        batches.append(_BATCH.decode(payload)[1])
    return batches


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _engine(scheme: str, seed: str | None, sink: ListSink) -> SimEngine:
    # The captures' engine: --block-size 32 --num-gpu-blocks-override 24.
    return SimEngine(
        "pod-a",
        block_size=32,
        num_blocks=24,
        scheme=VllmScheme(scheme, seed=seed, block_size=32),
        sink=sink,
    )


def test_pickle_capture_requests_give_the_captured_events() -> None:
    captured = captured_batches(PICKLE)
    sink = ListSink()
    engine = _engine("sha256", None, sink)  # vLLM's default: sha256, seed "vllm-none-hash"
    steps: dict[int, list[dict[str, Any]]] = {}
    for request in _lines(PICKLE / "requests.jsonl"):
        steps.setdefault(request["step"], []).append(request)
    compared_steps = 0
    for step in sorted(steps):
        requests = steps[step]
        start, end = requests[0]["events_capture_range"]
        before = len(sink.batches)
        if requests[0]["kind"] == "reset_prefix_cache":
            assert engine.reset()
        else:
            # One generate call: every prompt is admitted before any finishes.
            for request in requests:
                cached = engine.start(request["request_id"], request["prompt_token_ids"])
                assert cached == request["num_cached_tokens"], request["label"]
            for request in requests:
                engine.finish(request["request_id"], request["output_token_ids"])
        produced = sink.batches[before:]
        expected = captured[start:end]
        if len(requests) == 1:
            assert produced == expected, f"step {step}"  # same batches, event for event
        else:
            # Batched prompts: vLLM split the prefills over 2 steps, the simulation uses 3.
            assert len(expected) == 2 and len(produced) == 3
            assert [e for b in produced for e in b] == [e for b in expected for e in b]
        compared_steps += 1
    assert compared_steps == 20
    assert [e for b in sink.batches for e in b] == [e for b in captured for e in b]
    kinds = [type(e).__name__ for b in sink.batches for e in b]
    assert (kinds.count("BlockStored"), kinds.count("BlockRemoved")) == (25, 32)
    assert kinds.count("AllBlocksCleared") == 1
    assert engine.running == 0
    assert engine.blocks_stored == 60 and engine.blocks_removed == 32


def test_pickle_capture_held_keys_follow_the_events() -> None:
    """held_keys() is what the events describe: stored minus removed, counting copies."""
    sink = ListSink()
    engine = _engine("sha256", None, sink)
    copies: dict[int, int] = {}
    steps: dict[int, list[dict[str, Any]]] = {}
    for request in _lines(PICKLE / "requests.jsonl"):
        steps.setdefault(request["step"], []).append(request)
    most = 0
    for step in sorted(steps):
        requests = steps[step]
        if requests[0]["kind"] == "reset_prefix_cache":
            engine.reset()
            continue
        for request in requests:
            engine.start(request["request_id"], request["prompt_token_ids"])
        for request in requests:
            engine.finish(request["request_id"], request["output_token_ids"])
        copies = {}
        for event in (e for b in sink.batches for e in b):
            if isinstance(event, BlockStored):
                for key in event.block_hashes:
                    copies[key] = copies.get(key, 0) + 1
            elif isinstance(event, BlockRemoved):
                (key,) = event.block_hashes
                copies[key] -= 1
                if not copies[key]:
                    del copies[key]
            else:
                copies.clear()
        most = max(most, *copies.values())
        assert engine.held_keys() == set(copies), f"step {step}"
    assert most == 2  # one hash really lived in two physical blocks


def test_serve_capture_sha256_cbor_seed0_and_reset() -> None:
    captured = captured_batches(SERVE)
    sink = ListSink()
    engine = _engine("sha256_cbor", "0", sink)
    completions = [line["response"]["choices"][0] for line in _lines(SERVE / "requests.jsonl")]
    cached = []
    for number, choice in enumerate(completions):
        cached.append(engine.start(str(number), choice["prompt_token_ids"]))
        engine.finish(str(number), choice["token_ids"])
    assert cached == [0, 64, 64]  # the README: the 2nd and 3rd hit both full blocks
    assert engine.reset()
    assert sink.batches == captured[:1]  # the reset publishes nothing by itself
    after = json.loads((SERVE / "after_reset_response.json").read_text())["choices"][0]
    assert engine.start("after", after["prompt_token_ids"]) == 0
    engine.finish("after", after["token_ids"])
    assert sink.batches == captured
    assert isinstance(sink.batches[1][0], AllBlocksCleared)


# -- the rules, on small pools -------------------------------------------------------------------

BS = 4


def _small(num_blocks: int, sink: ListSink | None = None) -> SimEngine:
    scheme = make_scheme("sha256_cbor", seed="42", block_size=BS)
    return SimEngine("p", block_size=BS, num_blocks=num_blocks, scheme=scheme, sink=sink)


def _keys(tokens: list[int]) -> list[int]:
    return make_scheme("sha256_cbor", seed="42", block_size=BS).block_keys(tokens)


def _flat(sink: ListSink) -> list[tuple[str, list[int]]]:
    return [
        (type(e).__name__, list(getattr(e, "block_hashes", []))) for b in sink.batches for e in b
    ]


def test_last_prompt_token_is_always_recomputed() -> None:
    sink = ListSink()
    engine = _small(10, sink)
    prompt = list(range(100, 108))  # exactly 2 blocks
    k0, k1 = _keys(prompt)
    assert engine.start("a", prompt) == 0
    engine.finish("a")
    assert engine.held_keys() == {k0, k1}
    # Both blocks are cached, but the one holding the last token is computed again.
    assert engine.cached_tokens(prompt) == BS
    assert engine.cached_tokens([*prompt, 1]) == 2 * BS
    assert engine.start("b", prompt) == BS
    engine.finish("b")
    # ...so it is stored again, in a second physical block, with block 0 as its parent.
    last = sink.batches[-1][-1]
    assert isinstance(last, BlockStored)
    assert (last.block_hashes, last.parent_block_hash) == ([k1], k0)
    assert last.token_ids == prompt[BS:]


def test_decode_blocks_are_stored_and_the_last_output_token_is_not() -> None:
    sink = ListSink()
    engine = _small(10, sink)
    prompt, outputs = list(range(6)), [50, 51, 52, 53]
    engine.start("a", prompt)
    engine.finish("a", outputs)
    tokens = prompt + outputs  # KV of 9 tokens is computed: 2 full blocks
    k0, k1 = _keys(tokens[:8])
    stores = [e for b in sink.batches for e in b if isinstance(e, BlockStored)]
    assert (
        [(s.block_hashes, s.parent_block_hash, s.token_ids) for s in stores]
        == [
            ([k0], None, tokens[:4]),  # prefill: the prompt's one full block
            ([k1], k0, tokens[4:8]),  # decode: filled by outputs 50 and 51
        ]
    )
    assert len(sink.batches) == 2  # one batch per engine step that had events
    assert engine.start("b", [*tokens[:8], 0]) == 2 * BS  # hits the decode-made block too
    engine.finish("b", [7, 8])  # 10 computed tokens: no third full block
    assert engine.held_keys() == {k0, k1}


def test_free_queue_order_partial_blocks_first_then_lru_tail_first() -> None:
    sink = ListSink()
    engine = _small(7, sink)  # 6 usable blocks: 1..6
    a = list(range(1000, 1010))  # 2 full blocks (1, 2) + a partial one (3)
    ka = _keys(a)
    engine.start("a", a)
    engine.finish("a")
    # Free queue: 3 (partial, to the head), 4, 5, 6, then a1, a0 (cached, to the tail).
    assert engine.free_blocks == 6 and engine.used_blocks == 0
    sink.batches.clear()
    engine.start("c", list(range(3000, 3016)))  # 4 blocks: 3, 4, 5, 6
    assert [kind for kind, _ in _flat(sink)] == ["BlockStored"]  # nothing cached was evicted
    sink.batches.clear()
    engine.start("d", list(range(4000, 4008)))  # 2 blocks: a's, tail first
    removed = [keys for kind, keys in _flat(sink) if kind == "BlockRemoved"]
    assert removed == [[ka[1]], [ka[0]]]
    assert engine.free_blocks == 0


def test_a_request_never_evicts_its_own_prefix() -> None:
    sink = ListSink()
    engine = _small(4, sink)  # 3 usable blocks: 1, 2, 3
    a, c = list(range(500, 504)), list(range(600, 608))
    (a0,) = _keys(a)
    c0, c1 = _keys(c)
    engine.start("a", a)
    engine.finish("a")  # queue: 2, 3, 1 (a0)
    engine.start("c", c)
    engine.finish("c")  # queue: 1 (a0), 3 (c1), 2 (c0)
    sink.batches.clear()
    # a0 is at the head of the LRU; the hit takes it off the queue before allocating.
    assert engine.start("b", [*a, 9]) == BS
    assert _flat(sink) == [("BlockRemoved", [c1])]
    assert engine.held_keys() == {a0, c0}


def test_pool_exhausted_is_refused_without_side_effects() -> None:
    sink = ListSink()
    engine = _small(4, sink)
    engine.start("a", list(range(8)))
    assert not engine.can_start(list(range(100, 108)))
    assert engine.blocks_needed(list(range(100, 108))) == 2
    with pytest.raises(PoolExhaustedError):
        engine.start("b", list(range(100, 108)))
    assert engine.running == 1 and engine.used_blocks == 2
    assert engine.can_start(list(range(100, 104)))
    with pytest.raises(KVCacheError):
        engine.start("a", [1])
    with pytest.raises(KVCacheError):
        engine.finish("nope")


def test_reset_waits_for_idle_and_clears_with_the_next_step() -> None:
    sink = ListSink()
    engine = _small(10, sink)
    engine.start("a", list(range(8)))
    assert not engine.reset()  # vLLM refuses while requests hold blocks
    engine.finish("a")
    assert engine.reset()
    assert engine.held_keys() == set() and len(sink.batches) == 1
    engine.flush()
    assert sink.batches[-1] == [AllBlocksCleared()]
    assert engine.cached_tokens(list(range(9))) == 0
    assert engine.start("b", list(range(8))) == 0
    assert sink.restarts == 0


def test_restart_empties_the_pool_and_restarts_the_sequence() -> None:
    sink = ListSink()
    engine = _small(10, sink)
    engine.start("a", list(range(8)))
    engine.restart()
    assert sink.restarts == 1
    assert engine.running == 0 and engine.held_keys() == set()
    assert engine.free_blocks == engine.capacity_blocks == 9
    assert engine.kv_usage == 0.0
    engine.start("b", list(range(8)))
    assert engine.kv_usage == pytest.approx(2 / 9)


def test_short_prompt_publishes_nothing_and_scheme_must_match() -> None:
    sink = ListSink()
    engine = _small(10, sink)
    assert engine.start("a", [1, 2, 3]) == 0
    engine.finish("a", [4])
    assert sink.batches == []
    with pytest.raises(KVCacheError):
        SimEngine("p", block_size=8, num_blocks=10, scheme=make_scheme("sha256", block_size=4))
    with pytest.raises(KVCacheError):
        SimEngine("p", block_size=4, num_blocks=1, scheme=make_scheme("sha256", block_size=4))


def test_pickle_capture_replayed_step_by_step_gives_the_captured_events() -> None:
    """`decode` one token per engine step, the requests of one call in lockstep (as vLLM's
    scheduler runs them), gives the captured batches too; the three-prompt call, whose
    decode steps now interleave as the real engine's did, still has the same events."""
    captured = captured_batches(PICKLE)
    sink = ListSink()
    engine = _engine("sha256", None, sink)
    steps: dict[int, list[dict[str, Any]]] = {}
    for request in _lines(PICKLE / "requests.jsonl"):
        steps.setdefault(request["step"], []).append(request)
    for step in sorted(steps):
        requests = steps[step]
        start, end = requests[0]["events_capture_range"]
        before = len(sink.batches)
        if requests[0]["kind"] == "reset_prefix_cache":
            assert engine.reset()
        else:
            left = {}
            for request in requests:
                rid, outputs = request["request_id"], request["output_token_ids"]
                cached = engine.start(rid, request["prompt_token_ids"], outputs)
                assert cached == request["num_cached_tokens"], request["label"]
                left[rid] = len(outputs) - 1  # the last output is never fed
            while any(left.values()):
                for rid, count in left.items():
                    if count:
                        assert engine.decode(rid)
                        left[rid] = count - 1
            for rid in left:
                engine.finish(rid)
        produced, expected = sink.batches[before:], captured[start:end]
        if len(requests) == 1:
            assert produced == expected, f"step {step}"
        else:
            assert [e for b in produced for e in b] == [e for b in expected for e in b]
    assert [e for b in sink.batches for e in b] == [e for b in captured for e in b]
    assert engine.running == 0


def test_decode_refuses_a_dry_pool_and_preempt_keeps_the_cached_blocks() -> None:
    sink = ListSink()
    engine = _small(5, sink)  # 4 usable blocks
    prompt, outputs = list(range(100, 108)), [50, 51, 52, 53, 54, 55]
    assert engine.start("a", prompt, outputs) == 0  # blocks 1, 2
    engine.start("b", list(range(300, 306)))  # blocks 3, 4: the pool is full
    k0, k1 = _keys(prompt)
    before = len(sink.batches)
    # Output 50 starts a third block: none is free, so nothing happens (vLLM preempts).
    assert not engine.decode("a")
    assert len(sink.batches) == before and engine.used_blocks == 4
    engine.preempt("b")  # b's blocks: the partial one to the head, its full one to the tail
    assert engine.decode("a")  # takes b's partial block: no eviction, nothing stored yet
    assert engine.decode("a", 3)  # outputs 51..53 fill the block (10 + 2 of 12 tokens)
    k2 = _keys([*prompt, *outputs[:4]])[2]
    assert sink.batches[-1] == [
        BlockStored(
            [k2],
            k1,
            outputs[:4],
            BS,
            None,
            "GPU",
            None,
            [None],
            group_idx=0,
            kv_cache_spec_kind="full_attention",
        )
    ]
    with pytest.raises(KVCacheError, match="never the last"):
        engine.decode("a", 2)  # output 55 is sampled, never computed
    engine.preempt("a")
    assert engine.running == 0 and engine.used_blocks == 0 and engine.preemptions == 2
    # Preempted, a's blocks stay cached: resumed with its generated tokens, it hits them all.
    resumed = [*prompt, *outputs[:5]]
    assert engine.held_keys() >= {k0, k1, k2}
    assert engine.start("a", resumed, outputs[5:]) == 3 * BS
    with pytest.raises(KVCacheError):
        engine.preempt("nope")
    with pytest.raises(KVCacheError):
        engine.decode("nope")
