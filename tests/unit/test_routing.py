"""Load-aware routing over a real Indexer + MemoryIndex: costs, ranking, stickiness, tiers,
speculative credits and vLLM /metrics parsing.

Blocks are added the way an engine's events land in identity mode: ``index.add(None, keys,
[entry])`` with the keys ``indexer.block_keys`` computes (vLLM's own block hashes).
"""

from __future__ import annotations

import msgspec
import pytest

from kvcache import (
    CostModel,
    Decision,
    Indexer,
    PodCost,
    PodEntry,
    PodLoad,
    RequestExtras,
    Router,
    scrape_vllm_metrics,
)
from kvcache.errors import ConfigError
from kvcache.index.memory import MemoryIndex
from kvcache.inflight import INFLIGHT_IDLE_S

BLOCK = 16  # the default scheme's block size
PROMPT = list(range(1000, 1100))  # 100 tokens: 6 full blocks, 4 tokens in a partial block

# Distinct powers of ten so every term of a cost is recognisable in a sum.
MODEL = CostModel(
    prefill_per_token=0.001,
    cpu_hit_per_token=0.0001,
    queue_per_request=0.1,
    running_per_request=0.01,
    kv_pressure=0.0,
    queue_externality=0.0,
    stickiness=0.0,
)


class FakeClock:
    """A settable monotonic clock (seconds)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def indexer() -> Indexer:
    return Indexer(index=MemoryIndex())


def hold(
    indexer: Indexer, pod: str, blocks: int, tier: str = "gpu", prompt: list[int] = PROMPT
) -> None:
    """The pod's engine stored the prompt's first ``blocks`` blocks on ``tier``."""
    keys = indexer.block_keys(prompt)[:blocks]
    indexer.index.add(None, keys, [PodEntry(pod, tier)])


def by_pod(costs: list[PodCost]) -> dict[str, PodCost]:
    return {cost.pod: cost for cost in costs}


# -- the cost of one pod -------------------------------------------------------------------------


def test_cost_breakdown_terms(indexer: Indexer) -> None:
    hold(indexer, "a", 3)
    router = Router(indexer, MODEL)
    costs = by_pod(router.rank(PROMPT, [PodLoad("a", waiting=2, running=3), PodLoad("b")]))

    a = costs["a"]
    assert (a.cached_blocks_gpu, a.cached_blocks_cpu) == (3, 0)
    assert a.cached_tokens == 48
    assert a.uncached_tokens == 100 - 48
    assert a.queue_s == pytest.approx(2 * 0.1 + 3 * 0.01)
    assert a.prefill_s == pytest.approx(52 * 0.001)
    assert a.transfer_s == 0.0
    assert a.stickiness_s == 0.0
    assert a.predicted_ttft_s == pytest.approx(0.23 + 0.052)
    assert a.cost_s == pytest.approx(a.predicted_ttft_s)
    assert a.load == PodLoad("a", waiting=2, running=3)

    b = costs["b"]
    assert (b.cached_blocks_gpu, b.cached_blocks_cpu, b.uncached_tokens) == (0, 0, 100)
    assert b.queue_s == 0.0
    assert b.predicted_ttft_s == pytest.approx(0.1)


def test_last_prompt_token_is_always_recomputed(indexer: Indexer) -> None:
    # 64 tokens = 4 full blocks, all cached: vLLM caps a hit at 63 tokens, so 3 blocks count.
    prompt = PROMPT[:64]
    hold(indexer, "a", 4, prompt=prompt)
    (a,) = Router(indexer, MODEL).rank(prompt, [PodLoad("a")])
    assert a.cached_blocks_gpu == 3
    assert a.cached_tokens == 48
    assert a.uncached_tokens == 16
    # 65 tokens: the cap (64 // 16) lets all 4 blocks count; one token is left to compute.
    hold(indexer, "a", 4, prompt=[*prompt, 7])
    (a,) = Router(indexer, MODEL).rank([*prompt, 7], [PodLoad("a")])
    assert (a.cached_blocks_gpu, a.uncached_tokens) == (4, 1)


def test_prefix_ends_at_first_missing_block(indexer: Indexer) -> None:
    keys = indexer.block_keys(PROMPT)
    indexer.index.add(None, [keys[0], keys[1], keys[3], keys[4]], [PodEntry("a")])
    (a,) = Router(indexer, MODEL).rank(PROMPT, [PodLoad("a")])
    assert a.cached_blocks_gpu == 2
    assert a.uncached_tokens == 100 - 32


# -- ranking -------------------------------------------------------------------------------------


def test_rank_orders_by_cost_then_pod_id(indexer: Indexer) -> None:
    loads = [PodLoad("c"), PodLoad("b", running=1), PodLoad("a"), PodLoad("d", waiting=1)]
    ranked = Router(indexer, MODEL).rank(PROMPT, loads)
    # a and c cost the same (no cache, no load): pod id decides; then b (+0.01), then d (+0.1).
    assert [cost.pod for cost in ranked] == ["a", "c", "b", "d"]
    costs = [cost.cost_s for cost in ranked]
    assert costs == sorted(costs)


def test_cache_wins_until_the_queue_costs_more_than_the_prefill_saved(indexer: Indexer) -> None:
    hold(indexer, "a", 6)  # saves 6 * 16 = 96 tokens of prefill = 0.096 s
    router = Router(indexer, MODEL)
    assert router.pick(PROMPT, [PodLoad("a"), PodLoad("b")], speculative=False).pod == "a"
    # running 9 costs 0.09 s < 0.096 s saved: still a.
    picked = router.pick(PROMPT, [PodLoad("a", running=9), PodLoad("b")], speculative=False)
    assert picked.pod == "a"
    # one queued request costs 0.1 s > 0.096 s saved: b.
    decision = router.pick(PROMPT, [PodLoad("a", waiting=1), PodLoad("b")], speculative=False)
    assert decision.pod == "b"
    assert decision.ranked[0].cost_s == pytest.approx(0.1)
    assert decision.ranked[1].cost_s == pytest.approx(0.1 + 0.004)


def test_pod_filter_is_the_loads_given(indexer: Indexer) -> None:
    hold(indexer, "a", 6)
    hold(indexer, "b", 2)
    ranked = Router(indexer, CostModel(stickiness=0.5)).rank(PROMPT, [PodLoad("c"), PodLoad("b")])
    assert [cost.pod for cost in ranked] == ["b", "c"]
    b = ranked[0]
    assert b.cached_blocks_gpu == 2
    # b holds the longest prefix among the candidates, so it is the sticky one (a is absent).
    assert b.stickiness_s == 0.5
    assert ranked[1].cached_blocks_gpu == 0


def test_duplicate_and_missing_candidates_are_clear_errors(indexer: Indexer) -> None:
    router = Router(indexer, MODEL)
    assert router.rank(PROMPT, []) == []
    with pytest.raises(ValueError, match="at least one"):
        router.pick(PROMPT, [])
    with pytest.raises(ValueError, match=r"more than once: \['a'\]"):
        router.rank(PROMPT, [PodLoad("a"), PodLoad("b"), PodLoad("a")])


def test_empty_and_short_prompts(indexer: Indexer) -> None:
    hold(indexer, "a", 6)
    router = Router(indexer, MODEL)
    ranked = router.rank([], [PodLoad("b", running=1), PodLoad("a")])
    assert [(c.pod, c.uncached_tokens, c.prefill_s) for c in ranked] == [
        ("a", 0, 0.0),
        ("b", 0, 0.0),
    ]
    decision = router.pick(PROMPT[:10], [PodLoad("a"), PodLoad("b")])
    assert (decision.blocks, decision.speculative_blocks, decision.prompt_tokens) == (0, 0, 10)
    assert decision.ranked[0].uncached_tokens == 10
    assert decision.ranked[0].cached_blocks_gpu == 0
    assert router.statistics()["speculative_blocks_live"] == 0


# -- stickiness ----------------------------------------------------------------------------------

STICKY = CostModel(
    prefill_per_token=0.001,
    cpu_hit_per_token=0.0001,
    queue_per_request=0.0,
    running_per_request=0.01,
    saturation_kv_usage=0.9,
    saturation_waiting=3,
    kv_pressure=0.0,
    queue_externality=0.0,
    stickiness=0.02,
)


def test_stickiness_keeps_the_cache_holder_on_a_near_tie(indexer: Indexer) -> None:
    hold(indexer, "a", 2)  # saves 32 tokens = 0.032 s; running 4 costs 0.04 s
    router = Router(indexer, STICKY)
    decision = router.pick(PROMPT, [PodLoad("a", running=4), PodLoad("b")], speculative=False)
    costs = by_pod(decision.ranked)
    assert costs["a"].predicted_ttft_s == pytest.approx(0.108)
    assert costs["b"].predicted_ttft_s == pytest.approx(0.1)
    # a is predicted slower, but within the 0.02 s bonus of the cache holder.
    assert costs["a"].stickiness_s == 0.02
    assert costs["a"].cost_s == pytest.approx(0.088)
    assert costs["b"].stickiness_s == 0.0
    assert decision.pod == "a"


def test_stickiness_decays_as_kv_usage_passes_saturation(indexer: Indexer) -> None:
    hold(indexer, "a", 2)
    router = Router(indexer, STICKY)
    bonuses = []
    for usage in (0.5, 0.9, 0.95, 1.0):
        loads = [PodLoad("a", running=4, kv_usage=usage), PodLoad("b")]
        a = by_pod(router.rank(PROMPT, loads))["a"]
        bonuses.append(a.stickiness_s)
        # predicted 0.108 s (queue 0.04 + prefill 0.068), minus the bonus
        assert a.cost_s == pytest.approx(0.108 - a.stickiness_s)
    # full bonus up to the threshold, halfway past it 2/3, at a full pool half: never off.
    assert bonuses == pytest.approx([0.02, 0.02, 0.02 / 1.5, 0.01])
    loads = [PodLoad("a", running=5, kv_usage=1.0), PodLoad("b")]
    decision = router.pick(PROMPT, loads, speculative=False)
    assert by_pod(decision.ranked)["a"].saturated
    assert decision.pod == "b"  # 0.118 - 0.01 > 0.1
    loads = [PodLoad("a", running=5, kv_usage=0.89), PodLoad("b")]
    assert router.pick(PROMPT, loads, speculative=False).pod == "a"  # 0.118 - 0.02 < 0.1


def test_stickiness_decays_with_the_queue(indexer: Indexer) -> None:
    hold(indexer, "a", 2)
    router = Router(indexer, STICKY)  # queued requests cost nothing here: only the decay acts
    loads = [PodLoad("a", waiting=2, running=4), PodLoad("b")]
    decision = router.pick(PROMPT, loads, speculative=False)
    a = by_pod(decision.ranked)["a"]
    assert a.saturation == pytest.approx(2 / 3)
    assert a.stickiness_s == pytest.approx(0.02 / (1 + 2 / 3))  # 0.012: 0.096 < 0.1
    assert decision.pod == "a"
    loads = [PodLoad("a", waiting=3, running=4), PodLoad("b")]
    decision = router.pick(PROMPT, loads, speculative=False)
    a = by_pod(decision.ranked)["a"]
    assert a.saturated and a.stickiness_s == pytest.approx(0.01)  # halved at the threshold
    assert decision.pod == "a"  # 0.098 < 0.1
    loads = [PodLoad("a", waiting=6, running=4), PodLoad("b")]
    decision = router.pick(PROMPT, loads, speculative=False)
    assert by_pod(decision.ranked)["a"].stickiness_s == pytest.approx(0.02 / 3)
    assert decision.pod == "b"  # 0.1013 > 0.1


def test_stickiness_goes_to_every_pod_with_the_longest_prefix(indexer: Indexer) -> None:
    hold(indexer, "a", 3)
    hold(indexer, "b", 3)
    hold(indexer, "c", 1)
    costs = by_pod(Router(indexer, STICKY).rank(PROMPT, [PodLoad(p) for p in "abcd"]))
    assert [costs[p].stickiness_s for p in "abcd"] == [0.02, 0.02, 0.0, 0.0]


def test_no_stickiness_without_a_cache_holder(indexer: Indexer) -> None:
    costs = Router(indexer, STICKY).rank(PROMPT, [PodLoad("a"), PodLoad("b")])
    assert [cost.stickiness_s for cost in costs] == [0.0, 0.0]


# -- queued work and KV pressure ----------------------------------------------------------------


def test_queued_prefill_tokens_replace_the_per_request_queue_cost(indexer: Indexer) -> None:
    router = Router(indexer, MODEL)
    flat = PodLoad("a", waiting=3, running=1)
    work = PodLoad("b", waiting=3, running=1, queued_prefill_tokens=40)
    costs = by_pod(router.rank(PROMPT, [flat, work]))
    assert costs["a"].queue_s == pytest.approx(3 * 0.1 + 0.01)
    assert costs["b"].queue_s == pytest.approx(40 * 0.001 + 0.01)  # 3 queued hits: cheap
    assert "queued prefill 40 tokens" in costs["b"].explain()
    assert costs["b"].load.queued_prefill_tokens == 40
    with pytest.raises(ValueError, match="queued_prefill_tokens"):
        PodLoad("a", queued_prefill_tokens=-1)


def test_kv_pressure_charges_a_miss_at_the_fleets_kv_usage(indexer: Indexer) -> None:
    model = CostModel(
        prefill_per_token=0.001, running_per_request=0.0, kv_pressure=2.0, queue_externality=0.0
    )
    hold(indexer, "a", 6)  # a: 96 cached, 4 to prefill; b and c: all 100
    loads = [PodLoad("a", kv_usage=0.75), PodLoad("b", kv_usage=0.45), PodLoad("c")]
    decision = Router(indexer, model).pick(PROMPT, loads, speculative=False)
    costs = by_pod(decision.ranked)
    # prefill * weight * u / (1 - u) at the mean usage u = 0.4, computed here by hand
    assert decision.fleet.kv_usage == pytest.approx(0.4)
    assert costs["a"].kv_pressure_s == pytest.approx(0.004 * 2.0 * (0.4 / 0.6))
    assert costs["b"].kv_pressure_s == pytest.approx(0.1 * 2.0 * (0.4 / 0.6))
    # c's pool is empty, but its miss takes room the balancing router would use there
    assert costs["c"].kv_pressure_s == costs["b"].kv_pressure_s
    # not part of the predicted TTFT, part of the cost
    assert costs["b"].predicted_ttft_s == pytest.approx(0.1)
    assert costs["b"].cost_s == pytest.approx(0.1 + 0.2 * 2 / 3)
    assert "kv pressure 0.1333" in costs["b"].explain()
    assert "fleet waiting 0.00 kv 0.40" in decision.explain().splitlines()[0]
    full = by_pod(Router(indexer, model).rank(PROMPT, [PodLoad("b", kv_usage=1.0)]))["b"]
    assert full.kv_pressure_s == pytest.approx(0.1 * 2.0 * 99.0)  # capped, not infinite


def test_a_fuller_holder_pool_alone_does_not_push_its_hits_away(indexer: Indexer) -> None:
    """Pods of a saturated fleet swing between 0.9 and a full pool with each admission burst.
    Priced at a pod's own usage, the holder's 36 uncached tokens at 0.99 (x 99) outweighed
    another pod's 100 at 0.9 (x 9) and the request copied the prefix; at the fleet's usage
    the miss is what costs more."""
    model = CostModel(
        prefill_per_token=0.001, running_per_request=0.0, kv_pressure=2.0, queue_externality=0.0
    )
    hold(indexer, "a", 4)  # a: 64 cached, 36 to prefill; b: all 100
    loads = [PodLoad("a", kv_usage=0.99), PodLoad("b", kv_usage=0.9)]
    decision = Router(indexer, model).pick(PROMPT, loads, speculative=False)
    assert decision.pod == "a"
    a, b = by_pod(decision.ranked)["a"], by_pod(decision.ranked)["b"]
    ratio = 0.945 / 0.055
    assert a.kv_pressure_s == pytest.approx(0.036 * 2.0 * ratio)
    assert b.kv_pressure_s == pytest.approx(0.1 * 2.0 * ratio)
    # Each pod's own usage would have sent it away from its cache.
    own_a = a.predicted_ttft_s + model.pressure_seconds(a.prefill_s, 0.99)
    own_b = b.predicted_ttft_s + model.pressure_seconds(b.prefill_s, 0.9)
    assert own_a > own_b


EXTERNAL = CostModel(
    prefill_per_token=0.001,
    running_per_request=0.0,
    kv_pressure=0.0,
    stickiness=0.0,
    queue_externality=1.0,
)


def test_queue_externality_keeps_a_saturated_fleet_on_the_cache_holder(indexer: Indexer) -> None:
    """Every pod has a queue: leaving the holder's longer queue for a miss elsewhere would save
    this request 0.044 s and make the fleet prefill 96 more tokens, which delays the requests
    after it by the fleet's mean queue (8) times that work."""
    hold(indexer, "a", 6)  # a: 4 tokens to prefill; b and c: all 100
    loads = [
        PodLoad("a", waiting=10, queued_prefill_tokens=200),
        PodLoad("b", waiting=6, queued_prefill_tokens=60),
        PodLoad("c", waiting=8, queued_prefill_tokens=100),
    ]
    without = msgspec.structs.replace(EXTERNAL, queue_externality=0.0)
    spilled = Router(indexer, without).pick(PROMPT, loads, speculative=False)
    assert spilled.pod == "b"  # 0.06 + 0.1 < 0.2 + 0.004
    decision = Router(indexer, EXTERNAL).pick(PROMPT, loads, speculative=False)
    assert decision.pod == "a"
    assert decision.fleet.waiting == pytest.approx(8.0)
    costs = by_pod(decision.ranked)
    # prefill * weight * mean waiting, by hand; not part of the prediction
    assert costs["a"].queue_externality_s == pytest.approx(0.004 * 8)
    assert costs["b"].queue_externality_s == pytest.approx(0.1 * 8)
    assert costs["b"].predicted_ttft_s == pytest.approx(0.16)
    assert costs["a"].cost_s == pytest.approx(0.204 + 0.032)
    assert costs["b"].cost_s == pytest.approx(0.16 + 0.8)
    assert "queue externality 0.8000" in costs["b"].explain()
    assert "fleet waiting 8.00" in decision.explain().splitlines()[0]


def test_queue_externality_still_spills_off_a_saturated_holder_when_others_idle(
    indexer: Indexer,
) -> None:
    hold(indexer, "a", 6)
    loads = [
        PodLoad("a", waiting=10, queued_prefill_tokens=1000, kv_usage=0.95),
        PodLoad("b"),
        PodLoad("c"),
    ]
    decision = Router(indexer, EXTERNAL).pick(PROMPT, loads, speculative=False)
    # b: 0.1 + 0.1 * 10/3 = 0.433 against a: 1.004 + 0.004 * 10/3
    assert decision.pod == "b"
    assert by_pod(decision.ranked)["b"].cost_s == pytest.approx(0.1 + 0.1 * 10 / 3)
    # An idle fleet has no externality at all: the load alone decides.
    idle = [PodLoad("a", running=3), PodLoad("b", running=1)]
    costs = Router(indexer, EXTERNAL).rank(PROMPT, idle)
    assert [cost.queue_externality_s for cost in costs] == [0.0, 0.0]


def test_defaults_spill_off_a_saturated_holder_when_the_others_idle(indexer: Indexer) -> None:
    """Loads as vLLM's /metrics gives them (no queued work): the holder's 10 queued requests
    cost more than a copy on an idle pod, pressure and externality included."""
    prompt = list(range(5000, 5000 + 1216))
    hold(indexer, "a", 75, prompt=prompt)
    loads = [
        PodLoad("a", waiting=10, running=40, kv_usage=1.0),
        *(PodLoad(pod, running=5, kv_usage=0.2) for pod in "bcd"),
    ]
    decision = Router(indexer).pick(prompt, loads, speculative=False)
    assert decision.pod != "a"
    chosen = decision.ranked[0]
    assert chosen.queue_externality_s > 0.0 and chosen.kv_pressure_s > 0.0


def test_defaults_keep_a_saturated_fleet_on_its_cache(indexer: Indexer) -> None:
    """Every pod is past the old saturation cut-off (queue >= 4, kv >= 0.9): the holder of a
    long prefix, with hits queued, stays cheaper than copying the prefix elsewhere."""
    prompt = list(range(5000, 5000 + 1216))
    hold(indexer, "a", 75, prompt=prompt)
    loads = [
        PodLoad("a", waiting=6, running=40, kv_usage=0.95, queued_prefill_tokens=6 * 48),
        PodLoad("b", waiting=4, running=30, kv_usage=0.9, queued_prefill_tokens=4 * 48),
    ]
    decision = Router(indexer).pick(prompt, loads, speculative=False)
    assert decision.pod == "a"
    a, b = by_pod(decision.ranked)["a"], by_pod(decision.ranked)["b"]
    assert a.saturated and a.stickiness_s > 0.0  # decayed, not off
    assert b.kv_pressure_s > b.prefill_s  # the copy would evict more than it saves


# -- tiers ---------------------------------------------------------------------------------------


def test_cpu_only_hits_cost_a_transfer(indexer: Indexer) -> None:
    hold(indexer, "a", 2, "gpu")
    hold(indexer, "a", 5, "cpu")  # blocks 0-1 on both tiers, 2-4 offloaded only
    hold(indexer, "b", 5, "gpu")
    hold(indexer, "c", 5, "cpu")
    costs = by_pod(Router(indexer, MODEL).rank(PROMPT, [PodLoad(p) for p in "abcd"]))
    a = costs["a"]
    assert (a.cached_blocks_gpu, a.cached_blocks_cpu) == (2, 3)
    assert a.cached_tokens == 80
    assert a.uncached_tokens == 20
    assert a.transfer_s == pytest.approx(3 * 16 * 0.0001)
    assert a.predicted_ttft_s == pytest.approx(20 * 0.001 + 48 * 0.0001)
    c = costs["c"]
    assert (c.cached_blocks_gpu, c.cached_blocks_cpu) == (0, 5)
    assert c.transfer_s == pytest.approx(80 * 0.0001)
    # gpu hits are free, cpu hits cheaper than prefill: b < a < c < d (nothing cached)
    ranked = Router(indexer, MODEL).rank(PROMPT, [PodLoad(p) for p in "dcba"])
    assert [cost.pod for cost in ranked] == ["b", "a", "c", "d"]


def test_other_offload_tiers_count_as_transfers(indexer: Indexer) -> None:
    hold(indexer, "a", 2, "disk")
    (a,) = Router(indexer, MODEL).rank(PROMPT, [PodLoad("a")])
    assert (a.cached_blocks_gpu, a.cached_blocks_cpu) == (0, 2)


# -- speculative entries -------------------------------------------------------------------------


def test_speculative_credit_is_seen_by_the_next_rank_and_expires(indexer: Indexer) -> None:
    clock = FakeClock()
    router = Router(indexer, MODEL, speculative_ttl=2.0, clock=clock)
    loads = [PodLoad("a"), PodLoad("b", running=1)]
    decision = router.pick(PROMPT, loads)
    assert decision.pod == "a"
    assert decision.speculative_blocks == decision.blocks == 6

    keys = indexer.block_keys(PROMPT)
    spec = PodEntry("a", "gpu", speculative=True)
    assert indexer.index.lookup(keys) == [frozenset({spec})] * 6
    # a longer prompt sharing the 6 blocks now prefers a, even with b idle and a busier
    longer = [*PROMPT, *range(5000, 5040)]
    costs = by_pod(router.rank(longer, [PodLoad("a", running=5), PodLoad("b")]))
    assert costs["a"].cached_blocks_gpu == 6
    assert costs["b"].cached_blocks_gpu == 0

    clock.now += 1.999
    assert router.expire() == 0
    assert len(indexer.index.lookup(keys)) == 6
    clock.now += 0.001  # exactly the TTL
    costs = by_pod(router.rank(longer, [PodLoad("a"), PodLoad("b")]))  # expires lazily
    assert costs["a"].cached_blocks_gpu == 0
    assert indexer.index.lookup(keys) == []
    stats = router.statistics()
    assert stats["speculative_blocks_expired"] == 6
    assert stats["speculative_blocks_live"] == 0
    assert stats["decisions"] == 1
    assert stats["speculative_credits"] == 1


def test_expiry_keeps_confirmed_entries(indexer: Indexer) -> None:
    clock = FakeClock()
    router = Router(indexer, MODEL, clock=clock)
    keys = indexer.block_keys(PROMPT)
    confirmed = PodEntry("a", "gpu")
    cpu_copy = PodEntry("a", "cpu")
    indexer.index.add(None, keys[:4], [confirmed])
    indexer.index.add(None, keys[:2], [cpu_copy])
    assert router.pick(PROMPT, [PodLoad("a"), PodLoad("b")]).pod == "a"
    spec = PodEntry("a", "gpu", speculative=True)
    assert indexer.index.lookup(keys)[3] == {confirmed, spec}
    # the engine's events confirm block 4 meanwhile
    indexer.index.add(None, keys[4:5], [confirmed])

    clock.now += 10
    assert router.expire() == 6
    lookup = indexer.index.lookup(keys)
    assert lookup == [frozenset({confirmed, cpu_copy})] * 2 + [frozenset({confirmed})] * 3
    (a,) = router.rank(PROMPT, [PodLoad("a")])
    assert a.cached_blocks_gpu == 5


def test_a_newer_credit_of_the_same_blocks_outlives_the_older(indexer: Indexer) -> None:
    clock = FakeClock()
    router = Router(indexer, MODEL, speculative_ttl=2.0, clock=clock)
    keys = indexer.block_keys(PROMPT)
    router.pick(PROMPT, [PodLoad("a")])
    clock.now += 1.5
    router.pick(PROMPT[:64], [PodLoad("a")])  # re-credits blocks 0-3 until +3.5
    clock.now += 0.5  # the first credit's TTL: only blocks 4-5 go
    assert router.expire() == 2
    assert len(indexer.index.lookup(keys)) == 4
    clock.now += 1.5
    assert router.expire() == 4
    assert indexer.index.lookup(keys) == []


def test_credit_on_another_pod_does_not_touch_the_first(indexer: Indexer) -> None:
    clock = FakeClock()
    router = Router(indexer, MODEL, speculative_ttl=2.0, clock=clock)
    keys = indexer.block_keys(PROMPT)
    router.pick(PROMPT, [PodLoad("a"), PodLoad("b", waiting=1)])
    clock.now += 1.0
    router.pick(PROMPT, [PodLoad("a", waiting=1), PodLoad("b")])
    assert indexer.index.lookup(keys)[0] == {
        PodEntry("a", "gpu", speculative=True),
        PodEntry("b", "gpu", speculative=True),
    }
    clock.now += 1.0
    assert router.expire() == 6
    assert indexer.index.lookup(keys)[0] == {PodEntry("b", "gpu", speculative=True)}


def test_pick_without_speculation_leaves_the_index_alone(indexer: Indexer) -> None:
    router = Router(indexer, MODEL)
    decision = router.pick(PROMPT, [PodLoad("a")], speculative=False)
    assert decision.speculative_blocks == 0
    assert indexer.index.lookup(indexer.block_keys(PROMPT)) == []


def test_credit_uses_the_requests_extra_keys(indexer: Indexer) -> None:
    salted = RequestExtras(cache_salt="tenant-1")
    router = Router(indexer, MODEL)
    router.pick(PROMPT, [PodLoad("a"), PodLoad("b")], extra=salted)
    plain = by_pod(router.rank(PROMPT, [PodLoad("a"), PodLoad("b")]))
    assert plain["a"].cached_blocks_gpu == 0
    with_salt = by_pod(router.rank(PROMPT, [PodLoad("a"), PodLoad("b")], extra=salted))
    assert with_salt["a"].cached_blocks_gpu == 6


def test_ttl_must_be_positive(indexer: Indexer) -> None:
    with pytest.raises(ConfigError, match="speculative_ttl"):
        Router(indexer, speculative_ttl=0.0)


# -- in-flight accounting on top of scraped loads -------------------------------------------------


def prompt(n: int) -> list[int]:
    """A 100-token prompt sharing no block with ``prompt(m)`` for m != n."""
    return list(range(10_000 * (n + 1), 10_000 * (n + 1) + 100))


def test_without_a_scrape_time_a_burst_herds_onto_the_idlest_looking_pod(
    indexer: Indexer,
) -> None:
    router = Router(indexer, MODEL, clock=FakeClock())
    loads = [PodLoad("a"), PodLoad("b"), PodLoad("c")]  # the same numbers for the whole burst
    assert [router.pick(prompt(n), loads).pod for n in range(3)] == ["a", "a", "a"]
    assert router.statistics()["inflight_requests"] == 0


def test_picks_since_the_scrape_spread_a_burst(indexer: Indexer) -> None:
    clock = FakeClock()
    router = Router(indexer, MODEL, clock=clock)
    loads = [PodLoad(pod, scraped_at=clock.now - 0.01) for pod in "abc"]
    picked = []
    for n in range(4):
        picked.append(router.pick(prompt(n), loads).pod)
        clock.now += 0.001
    # Each pick counts as a request waiting on its pod until the next scrape of that pod.
    assert picked == ["a", "b", "c", "a"]
    costs = by_pod(router.rank(prompt(9), loads))
    assert (costs["a"].inflight, costs["b"].inflight, costs["c"].inflight) == (2, 1, 1)
    assert costs["a"].load.waiting == 2
    assert costs["a"].queue_s == pytest.approx(2 * MODEL.queue_per_request)
    assert router.statistics()["inflight_requests"] == 4


def test_inflight_picks_add_their_predicted_uncached_tokens(indexer: Indexer) -> None:
    clock = FakeClock()
    router = Router(indexer, MODEL, clock=clock)
    hold(indexer, "a", 3)  # 48 of the prompt's 100 tokens cached on a: 52 to prefill there
    scraped = PodLoad("a", queued_prefill_tokens=10, scraped_at=clock.now)
    decision = router.pick(PROMPT, [scraped], speculative=False)
    assert decision.ranked[0].uncached_tokens == 52
    (a,) = router.rank(prompt(1), [scraped])
    assert a.inflight == 1
    assert (a.load.waiting, a.load.queued_prefill_tokens) == (1, 10 + 52)
    assert a.queue_s == pytest.approx(62 * MODEL.prefill_per_token)
    assert "(1 sent since scrape)" in a.explain()


def test_a_newer_scrape_forgets_the_picks_it_already_shows(indexer: Indexer) -> None:
    clock = FakeClock()
    router = Router(indexer, MODEL, clock=clock)
    first = clock.now
    router.pick(prompt(0), [PodLoad("a", scraped_at=first)])  # at the scrape's instant: counted
    clock.now += 0.02
    router.pick(prompt(1), [PodLoad("a", scraped_at=first)])
    (a,) = router.rank(prompt(2), [PodLoad("a", scraped_at=first)])
    assert a.inflight == 2
    # A scrape between the two picks shows the first; the second is still in flight.
    (a,) = router.rank(prompt(2), [PodLoad("a", waiting=1, scraped_at=first + 0.01)])
    assert (a.inflight, a.load.waiting) == (1, 2)
    # A scrape after both shows both: nothing is added.
    newer = PodLoad("a", waiting=2, scraped_at=clock.now + 0.001)
    (a,) = router.rank(prompt(2), [newer])
    assert (a.inflight, a.load) == (0, newer)
    assert router.statistics()["inflight_requests"] == 0


def test_each_pod_counts_against_its_own_scrape(indexer: Indexer) -> None:
    clock = FakeClock()
    router = Router(indexer, MODEL, clock=clock)
    stale = [PodLoad("a", scraped_at=clock.now), PodLoad("b", waiting=1, scraped_at=clock.now)]
    assert router.pick(prompt(0), stale).pod == "a"
    clock.now += 0.01
    # b was scraped again (its queue drained); a's scrape is still the old one.
    fresh = [stale[0], PodLoad("b", scraped_at=clock.now)]
    costs = by_pod(router.rank(prompt(1), fresh))
    assert (costs["a"].inflight, costs["b"].inflight) == (1, 0)
    assert router.pick(prompt(1), fresh).pod == "b"


def test_an_older_snapshot_than_the_newest_counts_only_the_picks_after_it(
    indexer: Indexer,
) -> None:
    clock = FakeClock()
    router = Router(indexer, MODEL, clock=clock)
    start = clock.now
    for n in range(3):  # picks at start, +0.01, +0.02, predicted uncached tokens each
        router.pick(prompt(n), [PodLoad("a", queued_prefill_tokens=0, scraped_at=start)])
        clock.now += 0.01
    (a,) = router.rank(prompt(9), [PodLoad("a", queued_prefill_tokens=0, scraped_at=start + 0.015)])
    assert a.inflight == 1  # the newest snapshot retired the first two
    tokens = a.load.queued_prefill_tokens
    # A late answer from an earlier scrape: the picks after it that are still kept.
    (a,) = router.rank(prompt(9), [PodLoad("a", queued_prefill_tokens=0, scraped_at=start)])
    assert (a.inflight, a.load.queued_prefill_tokens) == (1, tokens)


def test_pods_idle_past_the_horizon_are_forgotten(indexer: Indexer) -> None:
    clock = FakeClock()
    router = Router(indexer, MODEL, clock=clock)
    router.pick(prompt(0), [PodLoad("gone", scraped_at=clock.now)])
    router.rank(prompt(1), [PodLoad("stays", scraped_at=clock.now)])
    assert router.statistics()["inflight_requests"] == 1
    clock.now += INFLIGHT_IDLE_S / 2
    router.rank(prompt(1), [PodLoad("stays", scraped_at=clock.now)])  # still scraped
    clock.now += INFLIGHT_IDLE_S / 2 + 1
    router.expire()
    assert router.statistics()["inflight_requests"] == 0
    assert set(router._inflight) == {"stays"}


def test_a_scrape_time_ahead_of_the_routers_clock_is_refused(indexer: Indexer) -> None:
    clock = FakeClock()
    router = Router(indexer, MODEL, clock=clock)
    with pytest.raises(ValueError, match="ahead of the Router's clock"):
        router.rank(prompt(0), [PodLoad("a", scraped_at=clock.now + 60.0)])  # time.time()?


# -- the explanation and the value types ---------------------------------------------------------


def test_decision_explains_itself_and_round_trips_as_json(indexer: Indexer) -> None:
    hold(indexer, "a", 3, "cpu")
    decision = Router(indexer, STICKY).pick(PROMPT, [PodLoad("a", running=2), PodLoad("b")])
    text = decision.explain()
    lines = text.splitlines()
    assert lines[0].startswith("-> a (100 tokens, 6 blocks, 6 credited)")
    assert lines[1].startswith("a: cost ")
    assert "blocks gpu 0 cpu 3" in lines[1]
    assert "sticky 0.0200" in lines[1]
    assert lines[2].startswith("b: cost ")
    again = msgspec.json.decode(msgspec.json.encode(decision), type=Decision)
    assert again == decision


def test_pod_load_and_cost_model_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="waiting"):
        PodLoad("a", waiting=-1)
    with pytest.raises(ValueError, match="kv_usage"):
        PodLoad("a", kv_usage=1.5)
    with pytest.raises(ValueError, match="kv_usage"):
        PodLoad("a", kv_usage=float("nan"))
    with pytest.raises(ValueError, match="scraped_at"):
        PodLoad("a", scraped_at=float("nan"))
    with pytest.raises(ValueError, match="scraped_at"):
        PodLoad("a", scraped_at=True)
    with pytest.raises(ValueError, match="pod"):
        PodLoad("")
    with pytest.raises(ConfigError, match="prefill_per_token"):
        CostModel(prefill_per_token=-1.0)
    with pytest.raises(ConfigError, match="stickiness"):
        CostModel(stickiness=float("inf"))
    with pytest.raises(ConfigError, match="saturation_kv_usage"):
        CostModel(saturation_kv_usage=2.0)
    with pytest.raises(ConfigError, match="kv_pressure"):
        CostModel(kv_pressure=-1.0)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"queue_per_request": -0.5}, CostModel)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"unknown": 1}, CostModel)
    assert msgspec.convert({"stickiness": 0.3}, CostModel).stickiness == 0.3


# -- vLLM /metrics -------------------------------------------------------------------------------

# Written by hand in the shape of a vLLM v1 server's /metrics page: metric names and their
# meaning from vLLM's "Production Metrics" docs (docs.vllm.ai, usage/metrics) and its v1 metrics
# design doc (vllm:num_requests_running / _waiting gauges, vllm:kv_cache_usage_perc as a 0-1
# fraction, labels model_name and engine, one engine per data-parallel rank); counters and a
# histogram surround them as on a real page.
VLLM_V1_METRICS = """\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 12003.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="Qwen/Qwen3-32B"} 7.0
vllm:num_requests_running{engine="1",model_name="Qwen/Qwen3-32B"} 5.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="Qwen/Qwen3-32B"} 2.0
vllm:num_requests_waiting{engine="1",model_name="Qwen/Qwen3-32B"} 1.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="Qwen/Qwen3-32B"} 0.8125
vllm:kv_cache_usage_perc{engine="1",model_name="Qwen/Qwen3-32B"} 0.4375
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="Qwen/Qwen3-32B"} 918345.0
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="Qwen/Qwen3-32B"} 1.204e+06
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="Qwen/Qwen3-32B"} 31.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="Qwen/Qwen3-32B"} 40.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="Qwen/Qwen3-32B"} 40.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="Qwen/Qwen3-32B"} 5.75
"""

# The older engine's KV gauge name (vLLM's v0 metrics: vllm:gpu_cache_usage_perc), no engine label.
VLLM_V0_METRICS = """\
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.25
"""


def test_scrape_sums_queues_and_takes_the_fullest_engine() -> None:
    load = scrape_vllm_metrics(VLLM_V1_METRICS)
    assert load == {"waiting": 3, "running": 12, "kv_usage": 0.8125}
    assert PodLoad("10.0.0.7:8000", **load) == PodLoad("10.0.0.7:8000", 3, 12, 0.8125)


def test_scrape_selects_an_engine_or_a_model() -> None:
    assert scrape_vllm_metrics(VLLM_V1_METRICS, engine="1") == {
        "waiting": 1,
        "running": 5,
        "kv_usage": 0.4375,
    }
    assert scrape_vllm_metrics(VLLM_V1_METRICS, model_name="Qwen/Qwen3-32B")["running"] == 12
    with pytest.raises(ValueError, match="for the selected labels"):
        scrape_vllm_metrics(VLLM_V1_METRICS, model_name="other")


def test_scrape_older_gpu_cache_usage_name() -> None:
    assert scrape_vllm_metrics(VLLM_V0_METRICS) == {"waiting": 0, "running": 3, "kv_usage": 0.25}


def test_scrape_prefers_the_newer_usage_name_when_both_are_exported() -> None:
    both = VLLM_V1_METRICS + (
        "# TYPE vllm:gpu_cache_usage_perc gauge\n"
        'vllm:gpu_cache_usage_perc{engine="0",model_name="Qwen/Qwen3-32B"} 0.99\n'
    )
    assert scrape_vllm_metrics(both)["kv_usage"] == 0.8125


def test_scrape_rejects_pages_that_are_not_vllm_metrics() -> None:
    with pytest.raises(ValueError, match="missing: vllm:num_requests_waiting"):
        scrape_vllm_metrics("# TYPE up gauge\nup 1.0\n")
    with pytest.raises(ValueError, match="kv_cache_usage_perc or vllm:gpu_cache_usage_perc"):
        scrape_vllm_metrics(VLLM_V0_METRICS.replace("gpu_cache_usage_perc", "other_perc"))
    with pytest.raises(ValueError, match="not a Prometheus text exposition"):
        scrape_vllm_metrics("<html>502 Bad Gateway</html>\n")
    with pytest.raises(ValueError, match="expected finite values"):
        scrape_vllm_metrics(VLLM_V0_METRICS.replace("} 3.0", "} -1.0"))
