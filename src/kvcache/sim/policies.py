"""Routing policies the simulator compares, from blind to perfectly informed.

* ``random``, ``round_robin``: no information.
* ``least_loaded``: load only (queued + running requests), llm-d's "load" scheduler.
* ``consistent_hash``: a hash ring on the prompt's first tokens (sticky, load-blind).
* ``approximate``: the Gateway API Inference Extension's default prefix scorer: the router
  remembers, per pod, the prefix chunks it sent there (an LRU of a fixed size that knows nothing
  of the pod's real cache), combined with queue and KV-usage scorers.
* ``precise``: kvcache's scores from the engines' real events (longest cached prefix).
* ``precise_load``: `kvcache.routing.Router` (prefix + load -> predicted TTFT, speculative).
* ``oracle``: perfect knowledge of every engine's cache and queue: `precise_load`'s objective
  (predicted TTFT + KV pressure + queueing externality - stickiness) computed on the true
  simulated state.

Every policy sees the same `RouteContext`: the request, its block keys (kvcache's scheme) and
each pod's load as of the latest /metrics scrape (the oracle alone reads the live load). Ties
are broken by load, then randomly from the policy's seeded generator.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from kvcache.indexer import Indexer
from kvcache.routing import CostModel, FleetLoad, PodLoad, Router
from kvcache.sim.workloads import SimRequest

POLICIES: tuple[str, ...] = (
    "random",
    "round_robin",
    "least_loaded",
    "consistent_hash",
    "approximate",
    "precise",
    "precise_load",
    "oracle",
)
"""Every policy, in the order reports list them."""

USES_INDEX = frozenset({"precise", "precise_load"})
"""Policies that read kvcache's index (and so depend on event delivery)."""


@dataclass(frozen=True, slots=True)
class RouteContext:
    """What a policy may look at for one decision."""

    now: float
    """Simulated seconds."""
    request: SimRequest
    keys: Sequence[int]
    """The prompt's block keys (kvcache's scheme: the engines' own hashes)."""
    loads: Sequence[PodLoad]
    """One per pod, in fleet order: what a router sees (the latest /metrics scrape)."""
    live_loads: Sequence[PodLoad] = ()
    """The same, live at ``now`` (empty: ``loads`` are live). Only the oracle reads it."""


class PodView(Protocol):
    """The oracle's view of one pod: the simulated engine and scheduler themselves."""

    def cached_tokens(self, tokens: Sequence[int]) -> int:
        """What the engine would serve from its cache for ``tokens`` right now."""
        ...

    def predict_ttft(
        self, now: float, prompt: Sequence[int], output_len: int, cached: int
    ) -> float:
        """Seconds to the first token if the request were submitted now and nothing else came."""
        ...


class Policy(Protocol):
    """Chooses a pod for each request."""

    name: str

    def choose(self, ctx: RouteContext) -> str:
        """The pod to send the request to."""
        ...


def _pending(load: PodLoad) -> int:
    return load.waiting + load.running


def _least_loaded(loads: Sequence[PodLoad], rng: random.Random) -> str:
    fewest = min(_pending(load) for load in loads)
    return rng.choice([load.pod for load in loads if _pending(load) == fewest])


def _best_then_least_loaded(
    values: Mapping[str, float], loads: Sequence[PodLoad], rng: random.Random
) -> str:
    """The pod with the highest value; ties (including "nobody has anything") by load."""
    best = max((values.get(load.pod, 0.0) for load in loads), default=0.0)
    tied = [load for load in loads if values.get(load.pod, 0.0) == best]
    return _least_loaded(tied, rng)


class RandomPolicy:
    """Uniformly random."""

    name = "random"

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def choose(self, ctx: RouteContext) -> str:
        """A random pod."""
        return self.rng.choice(ctx.loads).pod


class RoundRobinPolicy:
    """Each pod in turn."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, ctx: RouteContext) -> str:
        """The next pod."""
        pod = ctx.loads[self._next % len(ctx.loads)].pod
        self._next += 1
        return pod


class LeastLoadedPolicy:
    """Fewest queued + running requests (llm-d's load-only scheduler)."""

    name = "least_loaded"

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def choose(self, ctx: RouteContext) -> str:
        """The least loaded pod; ties at random."""
        return _least_loaded(ctx.loads, self.rng)


class ConsistentHashPolicy:
    """A hash ring (``replicas`` points per pod) keyed by the prompt's first ``prefix_tokens``."""

    name = "consistent_hash"

    def __init__(self, pods: Sequence[str], *, prefix_tokens: int = 256, replicas: int = 100):
        if prefix_tokens < 1 or replicas < 1:
            raise ValueError("consistent_hash: prefix_tokens and replicas must be >= 1")
        self.prefix_tokens = prefix_tokens
        ring = sorted(
            (_hash64(f"{pod}#{n}".encode()), pod) for pod in pods for n in range(replicas)
        )
        self._points = [point for point, _ in ring]
        self._pods = [pod for _, pod in ring]

    def choose(self, ctx: RouteContext) -> str:
        """The first ring point at or after the prefix's hash."""
        head = ctx.request.prompt[: self.prefix_tokens]
        key = _hash64(b"".join(token.to_bytes(4, "little") for token in head))
        at = bisect.bisect_left(self._points, key) % len(self._points)
        return self._pods[at]


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class ApproximatePolicy:
    """GIE's default prefix-cache scorer: router-side history, no engine feedback.

    The prompt is cut into ``chunk_tokens``-token chunks hashed as a chain (at most
    ``max_chunks``). Each pod has an LRU of ``lru_entries`` chunk hashes the router sent
    there; the prefix score is the fraction of the prompt's leading chunks found in a pod's LRU.
    GIE's defaults: 64-character chunks (``hashBlockSize``; 16 tokens at GIE's 4 characters per
    token, vLLM's block), 256 chunks (``maxPrefixBlocksToMatch``) and 31,250 entries per server
    (``lruCapacityPerServer``, sized for an 8B model on an 80 GB GPU: 500k tokens), a history
    that knows nothing of the pod's real cache: the router keeps crediting prefixes the engine
    evicted. The final score is ``w_prefix * prefix + w_queue * queue + w_kv * (1 - kv_usage)``,
    queue min-max normalised (GIE's queue scorer), highest wins (max-score picker, ties at
    random); weights as llm-d's benchmark (3/2/2).

    ``routers`` > 1 models a router tier of that many replicas, each request reaching one of
    them (``replica_rng``): every replica keeps its own history (GIE shares none between EPP
    replicas), the load signals are the pods' own metrics, so all replicas see them.
    """

    name = "approximate"

    def __init__(
        self,
        pods: Sequence[str],
        rng: random.Random,
        *,
        chunk_tokens: int = 16,
        max_chunks: int = 256,
        lru_entries: int = 31_250,
        weights: tuple[float, float, float] = (3.0, 2.0, 2.0),
        routers: int = 1,
        replica_rng: random.Random | None = None,
    ) -> None:
        if chunk_tokens < 1 or max_chunks < 1 or lru_entries < 1 or routers < 1:
            raise ValueError(
                "approximate: chunk_tokens, max_chunks, lru_entries, routers must be >= 1"
            )
        self.rng = rng
        self.chunk_tokens = chunk_tokens
        self.max_chunks = max_chunks
        self.lru_entries = lru_entries
        self.weights = weights
        self._replicas: list[dict[str, OrderedDict[int, None]]] = [
            {pod: OrderedDict() for pod in pods} for _ in range(routers)
        ]
        self._replica_rng = replica_rng or random.Random(0)
        self._history = self._replicas[0]

    @property
    def histories(self) -> list[dict[str, OrderedDict[int, None]]]:
        """Each router replica's per-pod history (chunk hashes, least recently used first)."""
        return self._replicas

    def chunks(self, prompt: Sequence[int]) -> list[int]:
        """Chained hashes of the prompt's full chunks (Python's tuple hash: deterministic)."""
        size = self.chunk_tokens
        count = min(len(prompt) // size, self.max_chunks)
        hashes: list[int] = []
        parent = 0
        for n in range(count):
            parent = hash((parent, tuple(prompt[n * size : (n + 1) * size])))
            hashes.append(parent)
        return hashes

    def prefix_scores(self, chunks: Sequence[int]) -> dict[str, float]:
        """Pod -> fraction of the prompt's leading chunks the router believes it holds."""
        scores: dict[str, float] = {}
        for pod, history in self._history.items():
            matched = 0
            for chunk in chunks:
                if chunk not in history:
                    break
                matched += 1
            scores[pod] = matched / len(chunks) if chunks else 0.0
        return scores

    def choose(self, ctx: RouteContext) -> str:
        """Weighted prefix + queue + KV-usage scores; then remember the choice."""
        if len(self._replicas) > 1:  # the replica this request reaches decides alone
            self._history = self._replicas[self._replica_rng.randrange(len(self._replicas))]
        chunks = self.chunks(ctx.request.prompt)
        prefix = self.prefix_scores(chunks)
        queues = [load.waiting for load in ctx.loads]
        low, high = min(queues), max(queues)
        w_prefix, w_queue, w_kv = self.weights
        totals: dict[str, float] = {}
        for load in ctx.loads:
            queue = 1.0 if high == low else (high - load.waiting) / (high - low)
            totals[load.pod] = (
                w_prefix * prefix.get(load.pod, 0.0)
                + w_queue * queue
                + w_kv * (1.0 - load.kv_usage)
            )
        best = max(totals.values())
        pod = self.rng.choice([p for p, total in totals.items() if total == best])
        self._remember(pod, chunks)
        return pod

    def _remember(self, pod: str, chunks: Sequence[int]) -> None:
        history = self._history[pod]
        for chunk in chunks:
            history[chunk] = None
            history.move_to_end(chunk)
        while len(history) > self.lru_entries:
            history.popitem(last=False)


class PrecisePolicy:
    """kvcache's longest-prefix scores (gpu 1.0, cpu 0.8 per block); ties by load."""

    name = "precise"

    def __init__(self, indexer: Indexer, rng: random.Random) -> None:
        self.indexer = indexer
        self.rng = rng

    def choose(self, ctx: RouteContext) -> str:
        """The pod with the longest cached prefix, as kvcache knows it."""
        pods = [load.pod for load in ctx.loads]
        # The same lookup `Indexer.score_tokens` does, on keys the runner already computed.
        runs = self.indexer.index.lookup_runs(ctx.keys, pods) if ctx.keys else []
        scores = self.indexer.scorer.score_runs(runs)
        return _best_then_least_loaded(scores, ctx.loads, self.rng)


class PreciseLoadPolicy:
    """`kvcache.routing.Router`: predicted TTFT from prefix hits and load, with speculation.

    Several routers model a router tier (each request reaches one, ``replica_rng``): they
    share one event-fed index, as replicas of kvcache do on a shared backend (Redis/Valkey)
    or each subscribed to every pod, speculative credits included.
    """

    name = "precise_load"

    def __init__(
        self, router: Router | Sequence[Router], replica_rng: random.Random | None = None
    ) -> None:
        self.routers = [router] if isinstance(router, Router) else list(router)
        if not self.routers:
            raise ValueError("precise_load needs at least one router")
        self.router = self.routers[0]
        self._replica_rng = replica_rng or random.Random(0)

    def choose(self, ctx: RouteContext) -> str:
        """The pod with the lowest predicted time to first token."""
        router = self.router
        if len(self.routers) > 1:
            router = self.routers[self._replica_rng.randrange(len(self.routers))]
        return router.pick(ctx.request.prompt, ctx.loads).pod


class OraclePolicy:
    """Perfect knowledge: every engine's cache and queue as they are, right now.

    The Router's objective with nothing estimated: the true time to first token
    (`PodView.predict_ttft`: the engine's cached tokens for the prompt, the scheduler's queue,
    free blocks and decoders' finishing steps), plus the same KV-pressure and queueing
    externality terms (at the live fleet's mean KV usage and waiting count) and minus the
    same stickiness (for the pods truly holding the longest prefix), from ``cost``. Greedy per
    request like every policy here: it sees the present exactly, not the requests to come, so
    it is the ceiling of what better information buys, not of every conceivable scheduler.
    A pure TTFT-greedy rule is no ceiling: it spreads prefixes and collapses under load.
    """

    name = "oracle"

    def __init__(self, truth: Mapping[str, PodView], cost: CostModel, rng: random.Random):
        self.truth = truth
        self.cost = cost
        self.rng = rng

    def choose(self, ctx: RouteContext) -> str:
        """The pod with the lowest true cost."""
        prompt = ctx.request.prompt
        output_len = len(ctx.request.output)
        loads = ctx.live_loads or ctx.loads
        cached = {load.pod: self.truth[load.pod].cached_tokens(prompt) for load in loads}
        longest = max(cached.values(), default=0)
        fleet = FleetLoad.of(loads)
        keys: dict[str, tuple[float, int]] = {}
        for load in loads:
            held = cached[load.pod]
            ttft = self.truth[load.pod].predict_ttft(ctx.now, prompt, output_len, held)
            prefill = (len(prompt) - held) * self.cost.prefill_per_token
            total = (
                ttft
                + self.cost.pressure_seconds(prefill, fleet.kv_usage)
                + self.cost.externality_seconds(prefill, fleet.waiting)
            )
            if longest and held == longest:
                total -= self.cost.holder_bonus(load)
            keys[load.pod] = (round(total, 9), -held)
        best = min(keys.values())
        return self.rng.choice([pod for pod, key in keys.items() if key == best])


def make_policy(
    name: str,
    *,
    pods: Sequence[str],
    seed: int,
    indexer: Indexer | None = None,
    router: Router | Sequence[Router] | None = None,
    truth: Mapping[str, PodView] | None = None,
    cost: CostModel | None = None,
    approximate_lru_entries: int = 31_250,
    approximate_chunk_tokens: int = 16,
    hash_prefix_tokens: int = 256,
    routers: int = 1,
) -> Policy:
    """The named policy over ``pods``; ValueError for an unknown name or a missing input.

    ``routers``: replicas of the approximate router, each with its own history (precise_load's
    replicas are the ``router`` sequence). Both draw a request's replica from the same seeded
    stream, so they split the same requests the same way.
    """
    rng = random.Random(f"{seed}:{name}")
    replica_rng = random.Random(f"{seed}:router-replica")
    if name == "random":
        return RandomPolicy(rng)
    if name == "round_robin":
        return RoundRobinPolicy()
    if name == "least_loaded":
        return LeastLoadedPolicy(rng)
    if name == "consistent_hash":
        return ConsistentHashPolicy(pods, prefix_tokens=hash_prefix_tokens)
    if name == "approximate":
        return ApproximatePolicy(
            pods,
            rng,
            chunk_tokens=approximate_chunk_tokens,
            lru_entries=approximate_lru_entries,
            routers=routers,
            replica_rng=replica_rng,
        )
    if name == "precise":
        if indexer is None:
            raise ValueError("the precise policy needs kvcache's indexer")
        return PrecisePolicy(indexer, rng)
    if name == "precise_load":
        if router is None:
            raise ValueError("the precise_load policy needs a kvcache.routing.Router")
        return PreciseLoadPolicy(router, replica_rng)
    if name == "oracle":
        if truth is None:
            raise ValueError("the oracle policy needs the engines")
        return OraclePolicy(truth, cost or CostModel(), rng)
    raise ValueError(f"unknown policy {name!r}: one of {', '.join(POLICIES)}")
