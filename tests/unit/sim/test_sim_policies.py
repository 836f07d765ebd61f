"""Routing policies as pure logic: each one's rule, with a real Indexer / Router where needed."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from kvcache import Indexer, PodEntry
from kvcache.routing import CostModel, PodLoad, Router
from kvcache.sim.policies import (
    POLICIES,
    ApproximatePolicy,
    ConsistentHashPolicy,
    RouteContext,
    make_policy,
)
from kvcache.sim.workloads import SimRequest

PODS = ["a", "b", "c"]


def ctx(
    prompt: Sequence[int], loads: Sequence[tuple[int, int]] | None = None, keys: Sequence[int] = ()
) -> RouteContext:
    given = loads or [(0, 0)] * len(PODS)
    return RouteContext(
        0.0,
        SimRequest("r", 0.0, list(prompt), [1]),
        list(keys),
        [PodLoad(p, waiting=w, running=r) for p, (w, r) in zip(PODS, given, strict=True)],
    )


def test_round_robin_and_random() -> None:
    rr = make_policy("round_robin", pods=PODS, seed=0)
    assert [rr.choose(ctx([1])) for _ in range(6)] == PODS * 2
    one, two = (make_policy("random", pods=PODS, seed=3) for _ in range(2))
    picks = [one.choose(ctx([1])) for _ in range(60)]
    assert picks == [two.choose(ctx([1])) for _ in range(60)]  # seeded
    assert set(picks) == set(PODS)


def test_least_loaded_counts_queued_and_running() -> None:
    policy = make_policy("least_loaded", pods=PODS, seed=0)
    assert policy.choose(ctx([1], [(2, 0), (0, 1), (0, 3)])) == "b"
    tied = {policy.choose(ctx([1], [(1, 0), (0, 1), (5, 5)])) for _ in range(40)}
    assert tied == {"a", "b"}  # ties at random, never the busy pod


def test_consistent_hash_is_sticky_on_the_prefix_and_spreads_prefixes() -> None:
    policy = ConsistentHashPolicy(PODS, prefix_tokens=8)
    prompt = list(range(100, 140))
    first = policy.choose(ctx(prompt))
    assert policy.choose(ctx([*prompt[:8], 9, 9, 9])) == first  # same first 8 tokens
    assert policy.choose(ctx(prompt, [(50, 50), (0, 0), (0, 0)])) == first  # load-blind
    spread = {policy.choose(ctx(list(range(n * 10, n * 10 + 8)))) for n in range(60)}
    assert spread == set(PODS)


def test_approximate_follows_its_own_history_until_load_outweighs_it() -> None:
    policy = ApproximatePolicy(PODS, random.Random(0), chunk_tokens=4)
    prompt = list(range(500, 540))  # 10 chunks
    first = policy.choose(ctx(prompt))
    same_prefix = [*prompt[:36], 1, 2, 3, 4]  # 9 of 10 chunks in common
    assert policy.choose(ctx(same_prefix)) == first
    assert policy.prefix_scores(policy.chunks(same_prefix))[first] == pytest.approx(1.0)
    # The remembered pod now has the longest queue: a full prefix (3 x 1.0) outweighs the
    # queue score the other pods get (2), so it stays...
    loads = [(8 if p == first else 0, 0) for p in PODS]
    assert policy.choose(ctx(prompt, loads)) == first
    # ...but with half the prefix known (3 x 0.5 < 2), the emptier pods win.
    half = [*prompt[:20], *range(9000, 9020)]
    assert policy.choose(ctx(half, loads)) != first


def test_approximate_history_is_a_bounded_lru_blind_to_real_evictions() -> None:
    policy = ApproximatePolicy(PODS, random.Random(0), chunk_tokens=4, lru_entries=3)
    old = list(range(100, 112))  # 3 chunks
    pod = policy.choose(ctx(old))
    assert policy.prefix_scores(policy.chunks(old))[pod] == 1.0
    new = list(range(900, 908))  # 2 chunks on the same pod push 2 of old's out
    loads = [(0, 0) if p == pod else (9, 9) for p in PODS]
    assert policy.choose(ctx(new, loads)) == pod
    assert policy.prefix_scores(policy.chunks(old))[pod] == 0.0  # first chunk evicted


def test_precise_uses_kvcache_scores_and_breaks_ties_by_load() -> None:
    indexer = Indexer()
    prompt = list(range(1000, 1000 + 64))  # 4 blocks
    keys = indexer.block_keys(prompt)
    indexer.index.add(None, keys[:2], [PodEntry("a")])
    indexer.index.add(None, keys[:3], [PodEntry("c")])
    policy = make_policy("precise", pods=PODS, seed=0, indexer=indexer)
    busy = [(0, 0), (0, 0), (20, 20)]
    assert policy.choose(ctx(prompt, busy, keys)) == "c"  # longest prefix wins, load aside
    other = list(range(7000, 7064))
    assert policy.choose(ctx(other, [(3, 0), (1, 0), (2, 0)], indexer.block_keys(other))) == "b"


def test_precise_load_routes_through_the_router() -> None:
    indexer = Indexer()
    prompt = list(range(2000, 2000 + 160))
    indexer.index.add(None, indexer.block_keys(prompt)[:8], [PodEntry("b")])
    now = [0.0]
    router = Router(indexer, clock=lambda: now[0])
    policy = make_policy("precise_load", pods=PODS, seed=0, router=router)
    assert policy.choose(ctx(prompt)) == "b"
    assert router.statistics()["decisions"] == 1


class FakePod:
    """A pod view with a fixed cache and a fixed wait before its prefill."""

    def __init__(self, cached: int, wait: float) -> None:
        self.cached = cached
        self.wait = wait

    def cached_tokens(self, tokens: Sequence[int]) -> int:
        return self.cached

    def predict_ttft(
        self, now: float, prompt: Sequence[int], output_len: int, cached: int
    ) -> float:
        return self.wait + (len(prompt) - cached) * 0.001


def test_oracle_minimises_true_ttft_plus_the_routers_pressure_and_stickiness() -> None:
    cost = CostModel(prefill_per_token=0.001, kv_pressure=0.0, stickiness=0.0)
    # a: nothing cached, idle (0.1 s); b: 96 cached but a long wait (0.2 + 0.004);
    # c: 96 cached, short wait (0.05 + 0.004).
    truth = {"a": FakePod(0, 0.0), "b": FakePod(96, 0.2), "c": FakePod(96, 0.05)}
    policy = make_policy("oracle", pods=PODS, seed=0, truth=truth, cost=cost)
    assert policy.choose(ctx([1] * 100)) == "c"
    # A cache-only rule would still pick b or c; the oracle leaves a queue that costs more
    # than the prefill it saves.
    truth["c"].wait = 0.2
    assert policy.choose(ctx([1] * 100)) == "a"
    # With the Router's KV-pressure term a miss on a busy pool costs more than the wait.
    busy = CostModel(prefill_per_token=0.001, kv_pressure=1.0, stickiness=0.0)
    policy = make_policy("oracle", pods=PODS, seed=0, truth=truth, cost=busy)
    loads = [PodLoad(p, kv_usage=0.8) for p in PODS]  # a pays 0.1 * 4 = 0.4 s of pressure
    context = RouteContext(0.0, SimRequest("r", 0.0, [1] * 100, [1]), [], loads)
    assert policy.choose(context) in {"b", "c"}


def test_make_policy_names_what_is_missing() -> None:
    assert POLICIES[-1] == "oracle" and len(POLICIES) == 8
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("best", pods=PODS, seed=0)
    for name in ("precise", "precise_load", "oracle"):
        with pytest.raises(ValueError, match="needs"):
            make_policy(name, pods=PODS, seed=0)


def test_approximate_replicas_keep_separate_histories() -> None:
    # Two router replicas, each request reaching one of them: a prefix one replica sent to a
    # pod is unknown to the other, which routes it by load alone.
    policy = make_policy("approximate", pods=PODS, seed=0, approximate_chunk_tokens=4, routers=2)
    assert isinstance(policy, ApproximatePolicy)
    prompt = list(range(300, 340))
    chosen = policy.choose(ctx(prompt))
    first_chunk = policy.chunks(prompt)[0]
    assert sorted(first_chunk in replica[chosen] for replica in policy.histories) == [False, True]
    single = make_policy("approximate", pods=PODS, seed=0, approximate_chunk_tokens=4)
    pod = single.choose(ctx(prompt))
    assert all(single.choose(ctx(prompt)) == pod for _ in range(10))


def test_approximate_defaults_are_gies() -> None:
    # hashBlockSize 64 characters = 16 tokens at GIE's 4 characters per token.
    policy = ApproximatePolicy(PODS, random.Random(0))
    assert (policy.chunk_tokens, policy.max_chunks, policy.lru_entries) == (16, 256, 31_250)
    assert len(policy.chunks(list(range(100, 100 + 16 * 5 + 7)))) == 5


def test_precise_load_replicas_share_the_index() -> None:
    indexer = Indexer()
    prompt = list(range(4000, 4000 + 160))
    indexer.index.add(None, indexer.block_keys(prompt)[:8], [PodEntry("c")])
    routers = [Router(indexer) for _ in range(2)]
    policy = make_policy("precise_load", pods=PODS, seed=0, router=routers)
    assert all(policy.choose(ctx(prompt)) == "c" for _ in range(8))
    decided = [router.statistics()["decisions"] for router in routers]
    assert sum(decided) == 8 and min(decided) > 0  # both replicas took requests
