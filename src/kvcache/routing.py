"""Load-aware routing: prefix hits and pod load -> a predicted time to first token per pod.

`Router.rank` prices every candidate pod in seconds (docs/routing.md)::

    predicted_ttft = queue + prefill + transfer
      queue    = queued prefill tokens * prefill_per_token   (or waiting * queue_per_request)
                 + running * running_per_request
      prefill  = uncached tokens * prefill_per_token
      transfer = tokens hit only on a non-gpu tier * cpu_hit_per_token
    pressure   = prefill * kv_pressure * u / (1 - u)   u = the candidates' mean KV usage
    externality = prefill * queue_externality * w       w = the candidates' mean waiting count
    sticky     = stickiness / (1 + saturation)      (the longest-prefix pod(s) only)
    cost       = predicted_ttft + pressure + externality - sticky

The pressure and the externality price what a miss costs everybody else (the blocks it takes,
the prefill work it adds) at the fleet's congestion: a router that balances load pools the
fleet, so work added to one pod delays later requests wherever they are sent.

and `Router.pick` takes the cheapest, then credits it with the prompt's blocks as speculative
index entries until the engine's own events confirm them (or the TTL runs out). Every decision
carries the per-pod breakdown (`PodCost`) that explains it.

Loads scraped from /metrics are stale between scrapes: a load that carries ``scraped_at`` gets
the requests this Router sent to the pod since then added on top (in-flight accounting), so
a burst of decisions between two scrapes does not pile onto the pod that looked idlest.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Annotated, Any

import msgspec

from kvcache.blocks import GPU, KeyType, PodEntry
from kvcache.errors import ConfigError, KVCacheError
from kvcache.hashing import RequestExtras
from kvcache.indexer import Indexer
from kvcache.inflight import INFLIGHT_IDLE_S, Picks

log = logging.getLogger("kvcache.routing")

NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0.0)]
Fraction = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]

# vLLM's /metrics names (docs.vllm.ai "Production Metrics"); the KV usage gauge was renamed
# from gpu_cache_usage_perc to kv_cache_usage_perc in the v1 engine. Both are fractions 0..1.
"""Preferred first: a vLLM that exports both during the deprecation reports the same value."""


class PodLoad(msgspec.Struct, frozen=True):
    """What the caller knows about a pod right now (from its scheduler or vLLM's /metrics)."""

    pod: str
    """The pod id, as in the index (the event topic's pod, e.g. ``10.0.0.7:8000``)."""
    waiting: NonNegativeInt = 0
    """Requests queued on the pod, not yet scheduled (``vllm:num_requests_waiting``)."""
    running: NonNegativeInt = 0
    """Requests in the pod's running batch (``vllm:num_requests_running``)."""
    kv_usage: Fraction = 0.0
    """Fraction of the pod's KV blocks held by running requests, 0..1
    (``vllm:kv_cache_usage_perc``; cached but unreferenced blocks count as free)."""
    queued_prefill_tokens: NonNegativeInt | None = None
    """Prompt tokens the pod still has to prefill before a new request's: the uncached tokens
    of its waiting requests plus what its running requests have left to prefill. Optional:
    vLLM does not export it, but a router that tracks what it sent (and the cached tokens it
    predicted) knows it. When given, the queue is priced as this work instead of a flat
    ``queue_per_request`` per waiting request."""
    scraped_at: float | None = None
    """When these numbers were measured, on the Router's clock (``time.monotonic()`` unless the
    Router was given another): e.g. the time a /metrics scrape was sent. Optional: when given,
    the Router adds the requests it picked this pod for since then (and their predicted
    uncached tokens) to ``waiting`` (and ``queued_prefill_tokens``), since the scrape cannot
    show them yet. None: the load is taken as current and nothing is added."""

    def __post_init__(self) -> None:
        # msgspec checks the constraints when decoding, not on direct construction.
        if not isinstance(self.pod, str) or not self.pod:
            raise ValueError(f"PodLoad.pod must be a non-empty string, got {self.pod!r}")
        if self.scraped_at is not None and (
            isinstance(self.scraped_at, bool)
            or not isinstance(self.scraped_at, int | float)
            or not math.isfinite(self.scraped_at)
        ):
            raise ValueError(
                f"PodLoad.scraped_at of {self.pod}: must be a finite time or None,"
                f" got {self.scraped_at!r}"
            )
        for name in ("waiting", "running", "queued_prefill_tokens"):
            value = getattr(self, name)
            if name == "queued_prefill_tokens" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"PodLoad.{name} of {self.pod}: must be an int >= 0, got {value!r}"
                )
        if not 0.0 <= self.kv_usage <= 1.0:  # also rejects NaN
            raise ValueError(
                f"PodLoad.kv_usage of {self.pod}: must be in [0, 1], got {self.kv_usage}"
            )


class FleetLoad(msgspec.Struct, frozen=True):
    """The candidates' congestion, which prices what a miss costs the rest of the fleet.

    A router that balances load pools its pods: work or blocks added to one pod push later
    requests to the others, so the delay a miss causes is felt at the fleet's congestion, not
    only at the chosen pod's. Means over the candidates of a decision (in-flight picks counted).
    """

    waiting: float = 0.0
    """Mean queued requests per candidate pod: estimates ``rho / (1 - rho)`` of the pooled
    queue (an M/M/1 queue holds ``rho**2 / (1 - rho)`` waiting requests on average, within
    ``rho < 1`` of it; both are 0 when nobody waits and grow without bound at saturation)."""
    kv_usage: float = 0.0
    """Mean KV usage of the candidates, 0..1."""

    @classmethod
    def of(cls, loads: Sequence[PodLoad]) -> FleetLoad:
        """The means of ``loads`` (all zero for no loads)."""
        if not loads:
            return cls()
        count = len(loads)
        return cls(
            waiting=sum(load.waiting for load in loads) / count,
            kv_usage=sum(load.kv_usage for load in loads) / count,
        )


class CostModel(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The constants of the predicted-TTFT model, in seconds (calibration: docs/routing.md).

    The defaults describe an H100-class GPU serving an 8B-32B model with chunked prefill; they
    set the ratios that matter (a cpu hit ~12x cheaper than prefill, a queued request ~ one
    average prefill, a block allocated in a full pool ~ as costly as the prefill it needed)
    and should be replaced by values measured on the fleet.
    """

    prefill_per_token: NonNegativeFloat = 6.25e-5
    """Seconds to prefill one uncached prompt token: 1 / the pod's prefill throughput (tokens/s).
    Default 16,000 tokens/s. From vLLM: rate(request_prefill_time_seconds_sum) / rate(computed
    prompt tokens), computed = prompt_tokens_total - prefix_cache_hits (both count tokens)."""
    cpu_hit_per_token: NonNegativeFloat = 5e-6
    """Seconds to bring one token's KV from a non-gpu tier (cpu offload) back to the GPU instead
    of recomputing it: KV bytes per token / host-to-device bandwidth. Default: 128 KiB per token
    (Llama-3-8B in bf16) over ~25 GB/s PCIe. Must stay below ``prefill_per_token`` for offload
    to pay off."""
    queue_per_request: NonNegativeFloat = 0.1
    """Seconds of wait per request queued ahead on the pod, used only when the load does not
    carry ``queued_prefill_tokens``: about one average prefill of the fleet's prompts. From
    vLLM: mean request_queue_time_seconds / mean num_requests_waiting."""
    running_per_request: NonNegativeFloat = 0.002
    """Seconds added to a new request's first token per request already running: the running
    decodes share each engine step (chunked prefill) with the new prompt. The slope of
    time_to_first_token_seconds against num_requests_running at a fixed prompt length."""
    kv_pressure: NonNegativeFloat = 10.0
    """Weight of the KV-pressure term: at a fleet whose pools are ``u`` full on average
    (`FleetLoad.kv_usage`), a pod pays ``kv_pressure * u / (1 - u)`` times its prefill on top
    of the predicted TTFT (u capped at 0.99). A miss costs the fleet more than its own
    prefill: its new blocks evict cached blocks later requests will recompute, and they stay
    allocated for the request's whole decode instead of being shared, which on a busy pool
    delays every admission (u / (1 - u) is the queueing delay per unit of work added at
    utilisation u). The fleet's mean, not the pod's own usage: the balancing router spreads
    the lost room over the fleet, and one pod's usage swings with each admission burst (0.99
    against 0.91 is 99 against 10), which would make a miss look cheaper on whichever pod was
    a little less full at the scrape. Not part of the prediction (this request does not wait
    for it): it keeps a busy fleet from trading everybody's cache for one request's shorter
    queue. The default, 10, is about how much longer a request holds its blocks decoding
    than its prompt takes to prefill. 0 disables it."""
    queue_externality: NonNegativeFloat = 1.0
    """Weight of the queueing externality: a pod pays ``queue_externality * w`` times its
    prefill on top of the predicted TTFT, ``w`` the candidates' mean waiting count
    (`FleetLoad.waiting`). Work W added to a queue at utilisation rho delays the requests
    after it by about ``W * rho / (1 - rho)`` in total, and the mean waiting count estimates
    ``rho / (1 - rho)``; the fleet's, because a balancing router shifts the delay onto every
    pod. A hit adds little work and pays little; a miss that would shorten its own wait by
    leaving a busy cache holder pays for the prefill it makes the whole fleet do. The term is
    0 when no candidate has a queue, so an unsaturated fleet still balances. The default, 1,
    is the queueing estimate itself (no fitted factor); 0 disables it."""
    saturation_kv_usage: Fraction = 0.9
    """KV usage from which the cache holder's stickiness decays; at a full pool it is halved."""
    saturation_waiting: NonNegativeInt = 4
    """Queued requests at which the cache holder's stickiness is halved (twice as many: a third,
    and so on)."""
    stickiness: NonNegativeFloat = 0.05
    """Bonus (seconds subtracted from the cost) of the pod(s) holding the longest prefix: stay
    on the cache holder unless another pod is predicted this much faster. Keeps one copy of a
    hot prefix instead of spreading it on near-ties. Decays smoothly as the holder saturates:
    ``stickiness / (1 + saturation)``, never switched off. 0 disables it."""

    def __post_init__(self) -> None:
        # ConfigError is a ValueError: msgspec turns it into a ValidationError when decoding.
        for name in (
            "prefill_per_token",
            "cpu_hit_per_token",
            "queue_per_request",
            "running_per_request",
            "kv_pressure",
            "queue_externality",
            "stickiness",
        ):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0.0):
                raise ConfigError(f"routing.{name}", f"must be a finite number >= 0, got {value!r}")
        if not 0.0 <= self.saturation_kv_usage <= 1.0:
            raise ConfigError(
                "routing.saturation_kv_usage", f"must be in [0, 1], got {self.saturation_kv_usage}"
            )
        if self.saturation_waiting < 0:
            raise ConfigError(
                "routing.saturation_waiting", f"must be >= 0, got {self.saturation_waiting}"
            )

    def saturation(self, load: PodLoad) -> float:
        """How saturated a pod is: ``waiting / saturation_waiting`` plus how far ``kv_usage`` is
        past ``saturation_kv_usage`` as a fraction of the rest of the pool (1 when full).
        0 for an unsaturated pod; a threshold of 0 makes any excess infinite."""
        queued = 0.0
        if load.waiting:
            queued = load.waiting / self.saturation_waiting if self.saturation_waiting else math.inf
        excess = load.kv_usage - self.saturation_kv_usage
        # excess > 0 implies saturation_kv_usage < 1: no division by zero.
        full = excess / (1.0 - self.saturation_kv_usage) if excess > 0.0 else 0.0
        return queued + full

    def pressure_seconds(self, prefill_s: float, kv_usage: float) -> float:
        """The KV-pressure term of a pod that must prefill ``prefill_s`` at ``kv_usage`` (the
        Router passes the fleet's mean, `FleetLoad.kv_usage`)."""
        return prefill_s * self.kv_pressure * _busy_ratio(kv_usage)

    def externality_seconds(self, prefill_s: float, waiting: float) -> float:
        """The queueing externality of ``prefill_s`` of new work when ``waiting`` requests wait
        per pod (`FleetLoad.waiting`)."""
        return prefill_s * self.queue_externality * waiting

    def holder_bonus(self, load: PodLoad) -> float:
        """The stickiness bonus of a longest-prefix holder under ``load``."""
        return self.stickiness / (1.0 + self.saturation(load))


class PodCost(msgspec.Struct, frozen=True):
    """Why a pod costs what it costs: one row of a decision's explanation (seconds rounded to
    the nanosecond)."""

    pod: str
    """The candidate pod."""
    cached_blocks_gpu: int
    """Leading prompt blocks the pod holds on gpu (speculative credits count as gpu)."""
    cached_blocks_cpu: int
    """Leading prompt blocks the pod holds only on another tier (cpu offload): transferred."""
    uncached_tokens: int
    """Prompt tokens the pod must prefill: the prompt minus the cached blocks' tokens (vLLM
    always recomputes the last prompt token, so a hit is capped at ``len(prompt) - 1``)."""
    queue_s: float
    """load.queued_prefill_tokens * prefill_per_token (when the load carries it, else
    waiting * queue_per_request) + running * running_per_request."""
    prefill_s: float
    """uncached_tokens * prefill_per_token."""
    transfer_s: float
    """cached_blocks_cpu * block_size * cpu_hit_per_token."""
    stickiness_s: float
    """The stickiness bonus this pod gets: stickiness / (1 + saturation) if it holds the
    longest prefix, else 0."""
    predicted_ttft_s: float
    """queue_s + prefill_s + transfer_s: the predicted time to first token."""
    cost_s: float
    """predicted_ttft_s + kv_pressure_s + queue_externality_s - stickiness_s: what the ranking
    sorts by."""
    cached_tokens: int
    """(cached_blocks_gpu + cached_blocks_cpu) * block_size: vLLM's expected num_cached_tokens."""
    saturated: bool
    """The pod's kv_usage or queue is at a saturation threshold: its stickiness is halved or
    less (it decays smoothly, see ``saturation``)."""
    load: PodLoad
    """The load the cost was computed from: the caller's, plus ``inflight`` requests in
    ``waiting`` (and their predicted uncached tokens in ``queued_prefill_tokens``)."""
    kv_pressure_s: float = 0.0
    """prefill_s * kv_pressure * u / (1 - u), u the fleet's mean KV usage: the cache this pod's
    new blocks evict, priced as the prefill it will cost others (not part of
    predicted_ttft_s)."""
    saturation: float = 0.0
    """`CostModel.saturation` of the load: the bonus is stickiness / (1 + saturation)."""
    inflight: int = 0
    """Requests this Router sent to the pod since its load was scraped (``scraped_at``),
    counted in ``load`` on top of what the scrape showed."""
    queue_externality_s: float = 0.0
    """prefill_s * queue_externality * the fleet's mean waiting count: the delay this pod's
    prefill work adds to the requests after it (not part of predicted_ttft_s)."""

    def explain(self) -> str:
        """One line: the cost and its terms."""
        pressure = f" + kv pressure {self.kv_pressure_s:.4f}" if self.kv_pressure_s else ""
        if self.queue_externality_s:
            pressure += f" + queue externality {self.queue_externality_s:.4f}"
        sticky = f" - sticky {self.stickiness_s:.4f}" if self.stickiness_s else ""
        saturated = f" saturation {self.saturation:.2f}" if self.saturation else ""
        queued = self.load.queued_prefill_tokens
        work = "" if queued is None else f" queued prefill {queued} tokens"
        sent = f" ({self.inflight} sent since scrape)" if self.inflight else ""
        return (
            f"{self.pod}: cost {self.cost_s:.4f}s = queue {self.queue_s:.4f}"
            f" + prefill {self.prefill_s:.4f} + transfer {self.transfer_s:.4f}{pressure}{sticky}"
            f" | blocks gpu {self.cached_blocks_gpu} cpu {self.cached_blocks_cpu},"
            f" uncached {self.uncached_tokens} tokens | waiting {self.load.waiting}{sent}"
            f" running {self.load.running}{work} kv {self.load.kv_usage:.2f}{saturated}"
        )


class Decision(msgspec.Struct, frozen=True):
    """A routing decision and its explanation (``msgspec.json.encode`` gives the JSON form)."""

    pod: str
    """The chosen pod: ``ranked[0].pod``."""
    ranked: list[PodCost]
    """Every candidate, cheapest first; equal costs by pod id."""
    prompt_tokens: int = 0
    """Tokens of the prompt."""
    blocks: int = 0
    """Full blocks of the prompt (the keys a speculative credit covers)."""
    speculative_blocks: int = 0
    """Blocks credited to ``pod`` as speculative entries (0 when not requested)."""
    fleet: FleetLoad = msgspec.field(default_factory=FleetLoad)
    """The candidates' mean waiting count and KV usage, which priced the externalities."""

    def explain(self) -> str:
        """The decision and every candidate's cost breakdown, one line each."""
        head = (
            f"-> {self.pod} ({self.prompt_tokens} tokens, {self.blocks} blocks,"
            f" {self.speculative_blocks} credited) | fleet waiting {self.fleet.waiting:.2f}"
            f" kv {self.fleet.kv_usage:.2f}"
        )
        return "\n".join([head, *(cost.explain() for cost in self.ranked)])


class Router:
    """Ranks pods by predicted TTFT and picks one, crediting it speculatively.

    Not a thread: expired speculative credits are removed on later `rank`/`pick` calls and by
    `expire()`. Safe to call from several threads.

    In-flight accounting: for a load that carries ``PodLoad.scraped_at``, the requests this
    Router picked the pod for at or after that time are added to the load before pricing (one
    waiting request each, and its predicted uncached tokens to ``queued_prefill_tokens`` when
    the load carries them). A newer snapshot of the pod forgets the picks it already shows.
    Between two scrapes every decision would otherwise see the same numbers and send a whole
    burst to the pod that looked least loaded. Several Routers in front of the same pods each
    count only their own picks. At most ``kvcache.inflight.MAX_INFLIGHT`` picks per pod are kept.
    """

    def __init__(
        self,
        indexer: Indexer,
        cost: CostModel | None = None,
        *,
        speculative_ttl: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (math.isfinite(speculative_ttl) and speculative_ttl > 0):
            raise ConfigError("routing.speculative_ttl", f"must be > 0, got {speculative_ttl}")
        self.indexer = indexer
        self.cost = cost or CostModel()
        self.speculative_ttl = speculative_ttl
        self._clock = clock
        self._lock = threading.Lock()
        # (pod, key) -> expiry of its newest credit: an older credit of the same block on the
        # same pod must not remove the entry a newer decision still counts on.
        self._expiry: dict[tuple[str, int], float] = {}
        self._pending: collections.deque[tuple[float, str, tuple[int, ...]]] = collections.deque()
        # pod -> (pick time, predicted uncached tokens) of the picks made since the newest
        # snapshot of the pod this Router saw; pod -> that snapshot's time.
        self._inflight: dict[str, Picks] = {}
        self._decisions = 0
        self._credited = 0
        self._expired = 0
        self._credit_failures = 0

    def rank(
        self,
        token_ids: Sequence[int],
        loads: Sequence[PodLoad],
        *,
        model: str = "",
        lora: str | None = None,
        extra: RequestExtras | None = None,
    ) -> list[PodCost]:
        """The cost of every pod in ``loads`` (the candidates), cheapest first, ties by pod id."""
        self.expire()
        return self._rank(token_ids, loads, model, lora, extra)[0]

    def pick(
        self,
        token_ids: Sequence[int],
        loads: Sequence[PodLoad],
        *,
        model: str = "",
        lora: str | None = None,
        extra: RequestExtras | None = None,
        speculative: bool = True,
    ) -> Decision:
        """The cheapest pod of ``loads``; with ``speculative``, credit it with the prompt's blocks.

        The credit is ``PodEntry(pod, "gpu", speculative=True)`` on every full block of the
        prompt, so the next request with the same prefix sees it before the engine's events
        arrive; it is removed after ``speculative_ttl`` (confirmed entries are separate entries
        and stay). Raises ValueError when ``loads`` is empty.
        """
        if not loads:
            raise ValueError("pick needs at least one candidate pod in loads")
        self.expire()
        ranked, keys, fleet = self._rank(token_ids, loads, model, lora, extra)
        chosen = ranked[0].pod
        credited = self._credit(chosen, keys) if speculative else 0
        with self._lock:
            self._decisions += 1
            if ranked[0].load.scraped_at is not None:
                picks = self._inflight.get(chosen)
                if picks is None:
                    picks = self._inflight[chosen] = Picks()
                picks.add(self._clock(), ranked[0].uncached_tokens)
        return Decision(chosen, ranked, len(token_ids), len(keys), credited, fleet)

    def expire(self) -> int:
        """Remove the speculative credits whose TTL ran out; returns how many blocks."""
        with self._lock:
            now = self._clock()
            removed = 0
            while self._pending and self._pending[0][0] <= now:
                _, pod, keys = self._pending.popleft()
                due = [key for key in keys if self._expiry.get((pod, key), math.inf) <= now]
                for key in due:
                    del self._expiry[(pod, key)]
                if not due:
                    continue
                entry = PodEntry(pod, GPU, speculative=True)
                try:
                    self.indexer.index.evict_many(due, KeyType.REQUEST, [entry])
                except KVCacheError as exc:  # a shared backend out of reach; its TTL ages them
                    self._credit_failures += 1
                    log.warning(
                        "expiring %d speculative blocks of %s failed: %s", len(due), pod, exc
                    )
                    continue
                removed += len(due)
            self._expired += removed
            # Pods gone from the fleet (no pick, no snapshot for a while) are forgotten.
            idle = now - INFLIGHT_IDLE_S
            for pod in [pod for pod, picks in self._inflight.items() if picks.touched < idle]:
                del self._inflight[pod]
            return removed

    def statistics(self) -> dict[str, Any]:
        """Decisions taken, speculative credits (decisions credited, blocks live, expired) and
        the picks counted on top of scraped loads (``inflight_requests``)."""
        with self._lock:
            return {
                "decisions": self._decisions,
                "inflight_requests": sum(len(p.picks) for p in self._inflight.values()),
                "speculative_credits": self._credited,
                "speculative_failures": self._credit_failures,
                "speculative_blocks_live": len(self._expiry),
                "speculative_blocks_expired": self._expired,
            }

    # -- internals --------------------------------------------------------------------------------

    def _with_inflight(self, load: PodLoad) -> tuple[PodLoad, int]:
        """``load`` plus this Router's picks of the pod since ``load.scraped_at``; their count."""
        if load.scraped_at is None:
            return load, 0
        with self._lock:
            now = self._clock()
            if load.scraped_at > now + 1.0:
                raise ValueError(
                    f"PodLoad.scraped_at of {load.pod} is {load.scraped_at - now:.3f} s ahead of"
                    " the Router's clock: give it on the Router's clock (time.monotonic() unless"
                    " the Router was made with another)"
                )
            picks = self._inflight.get(load.pod)
            if picks is None:
                picks = self._inflight[load.pod] = Picks()
            count, tokens = picks.since(load.scraped_at, now)
        if not count:
            return load, 0
        queued = load.queued_prefill_tokens
        return (
            msgspec.structs.replace(
                load,
                waiting=load.waiting + count,
                queued_prefill_tokens=None if queued is None else queued + tokens,
            ),
            count,
        )

    def _rank(
        self,
        token_ids: Sequence[int],
        loads: Sequence[PodLoad],
        model: str,
        lora: str | None,
        extra: RequestExtras | None,
    ) -> tuple[list[PodCost], list[int], FleetLoad]:
        """The ranking, the prompt's block keys (reused for the speculative credit) and the
        candidates' congestion."""
        pods = [load.pod for load in loads]
        if len(set(pods)) != len(pods):
            duplicates = sorted({pod for pod in pods if pods.count(pod) > 1})
            raise ValueError(f"loads name a pod more than once: {duplicates}")
        if not loads:
            return [], [], FleetLoad()
        block_size = self.indexer.scheme.block_size
        with self.indexer.read_priority.reading():
            keys = self.indexer.block_keys(token_ids, model, lora=lora, extra=extra)
            # vLLM caps a hit at len(prompt) - 1 tokens: the last prompt token is recomputed.
            cap = (len(token_ids) - 1) // block_size if token_ids else 0
            runs = self.indexer.index.lookup_runs(keys[:cap], pods) if cap else []
        held = _held_blocks(runs)
        model_ = self.cost
        longest = max((gpu + cpu for gpu, cpu in held.values()), default=0)
        current = [self._with_inflight(scraped) for scraped in loads]
        fleet = FleetLoad.of([load for load, _ in current])
        costs: list[PodCost] = []
        for load, inflight in current:
            gpu, cpu = held.get(load.pod, (0, 0))
            cached_tokens = (gpu + cpu) * block_size
            uncached = len(token_ids) - cached_tokens
            if load.queued_prefill_tokens is None:
                queue = load.waiting * model_.queue_per_request
            else:
                queue = load.queued_prefill_tokens * model_.prefill_per_token
            queue += load.running * model_.running_per_request
            prefill = uncached * model_.prefill_per_token
            transfer = cpu * block_size * model_.cpu_hit_per_token
            # What this pod's miss costs the others: priced at the fleet's congestion.
            pressure = model_.pressure_seconds(prefill, fleet.kv_usage)
            externality = model_.externality_seconds(prefill, fleet.waiting)
            saturated = (
                load.kv_usage >= model_.saturation_kv_usage
                or load.waiting >= model_.saturation_waiting
            )
            saturation = model_.saturation(load)
            sticky = longest > 0 and gpu + cpu == longest
            bonus = model_.holder_bonus(load) if sticky else 0.0
            ttft = queue + prefill + transfer
            costs.append(
                PodCost(
                    pod=load.pod,
                    cached_blocks_gpu=gpu,
                    cached_blocks_cpu=cpu,
                    uncached_tokens=uncached,
                    # Nanosecond rounding: equal costs stay equal whatever order the terms
                    # summed in, and the explanation carries no float noise.
                    queue_s=round(queue, 9),
                    prefill_s=round(prefill, 9),
                    transfer_s=round(transfer, 9),
                    stickiness_s=round(bonus, 9),
                    predicted_ttft_s=round(ttft, 9),
                    cost_s=round(ttft + pressure + externality - bonus, 9),
                    cached_tokens=cached_tokens,
                    saturated=saturated,
                    load=load,
                    kv_pressure_s=round(pressure, 9),
                    saturation=round(saturation, 9),
                    inflight=inflight,
                    queue_externality_s=round(externality, 9),
                )
            )
        costs.sort(key=lambda c: (c.cost_s, c.pod))
        return costs, keys, fleet

    def _credit(self, pod: str, keys: Sequence[int]) -> int:
        """Add the speculative entry on every key and schedule its expiry; returns blocks."""
        unique = tuple(dict.fromkeys(keys))
        if not unique:
            return 0
        entry = PodEntry(pod, GPU, speculative=True)
        with self._lock:
            try:
                self.indexer.index.add(None, unique, [entry])
            except KVCacheError as exc:  # a shared backend out of reach: the decision stands
                self._credit_failures += 1
                log.warning(
                    "speculative credit of %d blocks on %s failed: %s", len(unique), pod, exc
                )
                return 0
            expiry = self._clock() + self.speculative_ttl
            for key in unique:
                self._expiry[(pod, key)] = expiry
            self._pending.append((expiry, pod, unique))
            self._credited += 1
        return len(unique)


MAX_USAGE = 0.99
"""`kv_usage` is capped here in the pressure term: a full pool costs 99x the prefill, not inf."""


def _busy_ratio(kv_usage: float) -> float:
    """u / (1 - u): the marginal queueing delay per second of work added at utilisation u."""
    usage = min(kv_usage, MAX_USAGE)
    return usage / (1.0 - usage)


def _held_blocks(
    runs: Iterable[tuple[Collection[PodEntry], int]],
) -> dict[str, tuple[int, int]]:
    """Pod -> (leading blocks held on gpu, leading blocks held only on other tiers).

    A pod's prefix continues while it holds the block on any tier and ends at its first miss;
    speculative entries count as gpu (the credited pod computes those blocks itself).
    """
    gpu: dict[str, int] = {}
    cpu: dict[str, int] = {}
    active: set[str] | None = None
    for entries, length in runs:
        on_gpu: dict[str, bool] = {}
        for entry in entries:
            on_gpu[entry.pod] = (
                on_gpu.get(entry.pod, False) or entry.tier == GPU or entry.speculative
            )
        active = set(on_gpu) if active is None else active & on_gpu.keys()
        if not active:
            break
        for pod in active:
            tally = gpu if on_gpu[pod] else cpu
            tally[pod] = tally.get(pod, 0) + length
    return {pod: (gpu.get(pod, 0), cpu.get(pod, 0)) for pod in gpu.keys() | cpu.keys()}
