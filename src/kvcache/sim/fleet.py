"""A simulated fleet wired to a real kvcache, and the discrete-event loop that runs a workload.

Each pod is a `SimEngine` (vLLM's block pool) publishing real wire-format KV events through its
own `ZmqPublisher` to one in-process kvcache (`Indexer` + `IngestPipeline` + `Subscriber` bound
on a free loopback port), and a `PodScheduler` (timing.py) that decides when requests are
admitted and when tokens come out.

Routing happens in simulated time, events travel in real time. Before every decision the loop
releases the delayed messages that are due and then waits (bounded) until kvcache has applied
every message the publishers have put on their sockets: the index is then exactly as current
as the fault model allows, which is what makes "prediction accuracy 100% without faults" a
statement about kvcache and not about the machine's speed.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Annotated, Literal

import msgspec

from kvcache.config import Config, HashingConfig
from kvcache.events.pipeline import IngestPipeline
from kvcache.events.subscriber import Subscriber
from kvcache.hashing import make_scheme
from kvcache.indexer import Indexer
from kvcache.routing import CostModel, PodLoad, Router
from kvcache.sim.engine import PoolExhaustedError, SimEngine
from kvcache.sim.policies import Policy, RouteContext, make_policy
from kvcache.sim.results import Decision, RunRecord
from kvcache.sim.timing import Job, PodScheduler, TimingModel
from kvcache.sim.wire import ZmqPublisher
from kvcache.sim.workloads import SimRequest

log = logging.getLogger("kvcache.sim")

FaultKind = Literal["drop", "duplicate", "delay", "restart"]


class FaultAction(msgspec.Struct, frozen=True):
    """At simulated time ``at``: set a publisher's fault rate / delay, or restart a pod."""

    at: Annotated[float, msgspec.Meta(ge=0)]
    kind: FaultKind
    pod: int | None = None
    """Fleet position of the pod; None = every pod (not for restarts)."""
    value: float = 0.0
    """Probability for drop/duplicate, seconds for delay; unused for restart."""


GIE_REFRESH_METRICS_INTERVAL = 0.05
"""The Gateway API Inference Extension's default ``--refresh-metrics-interval`` (50 ms), the
refresh of every pod's /metrics that llm-d's benchmarks ran with."""

LLM_D_TOP_QPS = 60.0
"""The highest rate of llm-d's 73-capacity benchmark sweep (Poisson stages 3 -> 60 QPS)."""

SIM_TOP_QPS = 200.0
"""The highest rate of the default `kvcache sim` sweep."""

DEFAULT_SCRAPE_INTERVAL = GIE_REFRESH_METRICS_INTERVAL * LLM_D_TOP_QPS / SIM_TOP_QPS
"""15 ms of simulated time. The simulator compresses time (shorter prompts and outputs on a
faster model), so a wall-clock 50 ms would not mean what it meant there. What makes a stale
load signal matter is how many decisions share one snapshot: the arrivals per refresh. llm-d's
sweep tops at 60 QPS with a 50 ms refresh, 3 fleet-wide arrivals per refresh (1.75 at the 35
QPS where approximate started to degrade); the simulator's sweep tops at 200 QPS, so mapping
top rate to top rate (time scaled by 200 / 60) keeps 3 arrivals per scrape there. The
interval is then fixed for every rate, as a real refresh interval is (0.75 per scrape at 50
QPS, as llm-d's 15 QPS stage)."""


class FleetSpec(msgspec.Struct, frozen=True, kw_only=True):
    """The shape of the simulated fleet."""

    pods: Annotated[int, msgspec.Meta(ge=1)] = 4
    block_size: Annotated[int, msgspec.Meta(ge=1)] = 16
    capacity_blocks: Annotated[int, msgspec.Meta(ge=1)] = 2048
    """KV blocks per pod (vLLM's num_gpu_blocks minus the null block)."""
    timing: TimingModel = msgspec.field(default_factory=TimingModel)
    layout: str = "vllm-0.32"
    hash_scheme: str = "sha256"
    approximate_lru_entries: int | None = None
    """The approximate router's history per pod, in chunks of ``APPROXIMATE_CHUNK_TOKENS``.
    None: GIE's default as llm-d's benchmark ran it against its pods (31,250 entries of 16
    tokens for 307,328 KV tokens: 1.63 times what a pod holds), scaled to ``capacity_blocks``."""
    routers: Annotated[int, msgspec.Meta(ge=1)] = 1
    """Router replicas in front of the fleet; each request reaches one of them at random. The
    approximate router's replicas keep separate histories; precise_load's share the index."""
    speculative_ttl: float = 2.0
    scrape_interval: Annotated[float, msgspec.Meta(ge=0)] = DEFAULT_SCRAPE_INTERVAL
    """Simulated seconds between two scrapes of the pods' /metrics: the routers see each pod's
    waiting / running / KV usage as of the latest scrape (all pods scraped at the same ticks,
    0, interval, 2 x interval, ...), as GIE's endpoint picker refreshes them on its own loop.
    The oracle always sees the live state. 0: every decision sees the live state."""
    sync_timeout: float = 5.0
    """Real seconds to wait for kvcache to apply what was sent before a decision."""


APPROXIMATE_CHUNK_TOKENS = 16
"""GIE's ``hashBlockSize`` is 64 characters, 16 tokens at the 4 characters per token its docs
assume (and vLLM's block size): the approximate policy hashes 16-token chunks."""

LLM_D_HISTORY_PER_CAPACITY = 31_250 * APPROXIMATE_CHUNK_TOKENS / 307_328
"""Tokens of router-side history per token of pod KV in llm-d's approximate-prefix benchmark
(GIE's default 31,250 LRU entries per server, each 64 characters ~ 16 tokens, against
307,328-token pods): 1.63. GIE's guide asks for a history "as close as possible" to the pod's
cache; its default is sized for an 8B model on one 80 GB GPU (500k tokens)."""


def approximate_history(spec: FleetSpec) -> int:
    """LRU entries per pod for the approximate policy (`FleetSpec.approximate_lru_entries`)."""
    if spec.approximate_lru_entries is not None:
        return spec.approximate_lru_entries
    tokens = spec.capacity_blocks * spec.block_size
    return max(1, round(tokens * LLM_D_HISTORY_PER_CAPACITY / APPROXIMATE_CHUNK_TOKENS))


def pod_name(number: int) -> str:
    """The pod id of fleet position ``number`` (as engines' topics name pods)."""
    return f"10.0.0.{number + 1}:8000"


def cost_model(timing: TimingModel) -> CostModel:
    """The Router's constants for the simulated engines, as an operator would measure them.

    Only the timing model's own rates: a prompt token's prefill, and a running request's share
    of every step (its context read, at the typical context of a prompt plus the decode done
    so far, approximated by ``max_batched_tokens`` / 8 tokens). Saturation thresholds,
    stickiness and the KV-pressure weight stay at the Router's defaults.
    """
    return CostModel(
        prefill_per_token=timing.prefill_per_token,
        running_per_request=timing.kv_read_per_token * timing.max_batched_tokens / 8,
    )


class TruePod:
    """The oracle's view of one pod: its engine and scheduler as they are (`PodView`)."""

    def __init__(self, engine: SimEngine, scheduler: PodScheduler) -> None:
        self.engine = engine
        self.scheduler = scheduler

    def cached_tokens(self, tokens: Sequence[int]) -> int:
        """The engine's cached tokens for ``tokens`` right now, or, if more, the full blocks
        it shares with a request already queued there (admitted first, it computes them)."""
        held = self.engine.cached_tokens(tokens)
        size = self.engine.block_size
        cap = (len(tokens) - 1) // size * size if tokens else 0
        for job in self.scheduler.waiting:
            shared = held
            while shared + size <= cap and (
                tokens[shared : shared + size] == job.prompt[shared : shared + size]
            ):
                shared += size
            if shared > held and tokens[:held] == job.prompt[:held]:
                held = shared
        return held

    def predict_ttft(
        self, now: float, prompt: Sequence[int], output_len: int, cached: int
    ) -> float:
        """`PodScheduler.predict_ttft` for this prompt: its new blocks (plus its decode reserve
        when the scheduler reserves one)."""
        size = self.engine.block_size
        prompt_blocks = -(-len(prompt) // size)
        reserve = 0
        if self.scheduler.reserves_decode_blocks:
            reserve = -(-(len(prompt) + output_len) // size) - prompt_blocks + 1
        return self.scheduler.predict_ttft(
            now, uncached=len(prompt) - cached, blocks=prompt_blocks - cached // size + reserve
        )


class Fleet:
    """Engines, publishers and the in-process kvcache of one run. Use as a context manager."""

    def __init__(self, spec: FleetSpec, *, seed: int = 0) -> None:
        self.spec = spec
        self.now = 0.0
        hashing = msgspec.convert(
            {"scheme": spec.hash_scheme, "block_size": spec.block_size}, HashingConfig
        )
        self.indexer = Indexer(Config(hashing=hashing))
        self.pipeline = IngestPipeline(self.indexer.index, self.indexer.scheme)
        self.subscriber = Subscriber(self.pipeline.submit, bind=["tcp://127.0.0.1:0"])
        self.subscriber.start()
        endpoint = self.subscriber.bound[0]
        self.pods = [pod_name(n) for n in range(spec.pods)]
        self.publishers: list[ZmqPublisher] = []
        self.engines: list[SimEngine] = []
        self.schedulers: list[PodScheduler] = []
        try:
            for number, pod in enumerate(self.pods):
                publisher = ZmqPublisher(
                    endpoint,
                    f"kv@{pod}@sim-model",
                    layout=spec.layout,
                    rng=random.Random(f"{seed}:faults:{number}"),
                    clock=self._clock,
                    bind=False,
                )
                self.publishers.append(publisher)
                # The engines' own scheme object: the ingest thread verifies with kvcache's.
                scheme = make_scheme(spec.hash_scheme, block_size=spec.block_size)
                engine = SimEngine(
                    pod,
                    block_size=spec.block_size,
                    num_blocks=spec.capacity_blocks + 1,
                    scheme=scheme,
                    sink=publisher,
                )
                self.engines.append(engine)
                self.schedulers.append(PodScheduler(engine, spec.timing))
            for publisher in self.publishers:
                if not publisher.wait_subscribed(spec.sync_timeout):
                    raise RuntimeError("kvcache's subscriber did not see the simulated engines")
        except BaseException:
            self.close()
            raise
        self.sync_timeouts = 0
        self.scrapes = 0
        self._scraped: list[PodLoad] = self.live_loads(scraped_at=0.0)
        self._next_scrape = 0  # index of the next scrape tick (at index * scrape_interval)

    def _clock(self) -> float:
        return self.now

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the sockets and stop kvcache's subscriber."""
        for publisher in self.publishers:
            publisher.close()
        self.subscriber.stop()

    # -- the kvcache side ---------------------------------------------------------------------

    def applied_messages(self) -> int:
        """Messages kvcache has applied (inline pipeline: applied as received)."""
        return sum(applier.stats.messages for applier in self.pipeline.appliers)

    def sync(self) -> bool:
        """Release due delayed messages, then wait until kvcache applied all that was sent."""
        for publisher in self.publishers:
            if publisher.held:
                publisher.release_due(self.now)
        target = sum(publisher.sent for publisher in self.publishers)
        if self.applied_messages() >= target:
            return True
        deadline = time.monotonic() + self.spec.sync_timeout
        pause = 2e-5
        while self.applied_messages() < target:
            if time.monotonic() > deadline:
                self.sync_timeouts += 1
                log.warning("kvcache did not apply every sent message within the sync timeout")
                return False
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)
        return True

    def predicted_tokens(self, keys: Sequence[int], prompt_len: int, pod: str) -> int:
        """kvcache's prediction of the pod's cached tokens from confirmed (event) entries only.

        Speculative credits are left out: they anticipate blocks the engine does not hold yet,
        and accuracy measures whether the index mirrors the engines.
        """
        bs = self.spec.block_size
        cap = min(len(keys), (prompt_len - 1) // bs) if prompt_len else 0
        if cap == 0:
            return 0
        blocks = 0
        for entries, length in self.indexer.index.lookup_runs(keys[:cap], [pod]):
            if not any(e.pod == pod and not e.speculative for e in entries):
                break
            blocks += length
        return blocks * bs

    def live_loads(self, scraped_at: float | None = None) -> list[PodLoad]:
        """Each pod's load right now as its /metrics shows it, plus the prefill work queued on it
        as a router tracking its decisions knows it (its expected cached tokens per waiting
        request); ``scraped_at`` stamps it as a snapshot taken then."""
        return [
            PodLoad(
                pod,
                waiting=s.queued,
                running=s.running,
                kv_usage=s.kv_usage,
                queued_prefill_tokens=s.queued_prefill_tokens,
                scraped_at=scraped_at,
            )
            for pod, s in zip(self.pods, self.schedulers, strict=True)
        ]

    def loads(self) -> list[PodLoad]:
        """The loads the routers see: the latest scrape (stamped with its tick), or the live
        state when ``scrape_interval`` is 0."""
        if self.spec.scrape_interval <= 0:
            return self.live_loads()
        return self._scraped

    def observe(self, at: float) -> None:
        """Scrape every pod if a scrape tick fell at or before ``at``.

        Called before the loop processes anything at ``at``: nothing has changed since the
        previous event, so the state now is the state at the last tick, and the snapshot is
        stamped with that tick's time (the routers' clock is simulated time).
        """
        interval = self.spec.scrape_interval
        if interval <= 0 or at < self._next_scrape * interval:
            return
        tick = max(self._next_scrape, math.floor(at / interval))
        # Float rounding of the division: the tick is the last one at or before ``at``.
        if (tick + 1) * interval <= at:
            tick += 1
        elif tick > self._next_scrape and tick * interval > at:
            tick -= 1
        self._scraped = self.live_loads(scraped_at=tick * interval)
        self._next_scrape = tick + 1
        self.scrapes += 1

    def ingest_statistics(self) -> dict[str, int]:
        """kvcache's ingest counters that matter here."""
        stats = self.pipeline.statistics()
        return {
            name: int(stats[name])
            for name in ("messages", "blocks_stored", "blocks_removed", "gaps", "resets")
        }

    def publisher_statistics(self) -> dict[str, int]:
        """The publishers' counters, summed."""
        total: dict[str, int] = {}
        for publisher in self.publishers:
            for name, value in publisher.statistics().items():
                total[name] = total.get(name, 0) + value
        return total

    # -- faults -------------------------------------------------------------------------------

    def apply_fault(self, action: FaultAction, record: RunRecord) -> None:
        """Change a publisher's fault model or restart a pod (its requests are lost)."""
        targets = range(len(self.pods)) if action.pod is None else [action.pod]
        for number in targets:
            if not 0 <= number < len(self.pods):
                raise ValueError(f"fault {action.kind} at {action.at}: no pod {number}")
            publisher = self.publishers[number]
            if action.kind == "drop":
                publisher.drop_rate = action.value
            elif action.kind == "duplicate":
                publisher.duplicate_rate = action.value
            elif action.kind == "delay":
                publisher.delay_s = action.value
            else:
                record.aborted += len(self.schedulers[number].abort_all(self.now))
                self.engines[number].restart()


def build_policy(name: str, fleet: Fleet, requests: Sequence[SimRequest], seed: int) -> Policy:
    """The named policy, wired to this fleet's kvcache and engines."""
    routers = None
    cost = cost_model(fleet.spec.timing)
    if name == "precise_load":
        routers = [
            Router(
                fleet.indexer,
                cost,
                speculative_ttl=fleet.spec.speculative_ttl,
                clock=fleet._clock,
            )
            for _ in range(fleet.spec.routers)
        ]
    return make_policy(
        name,
        pods=fleet.pods,
        seed=seed,
        indexer=fleet.indexer,
        router=routers,
        truth={
            pod: TruePod(engine, scheduler)
            for pod, engine, scheduler in zip(
                fleet.pods, fleet.engines, fleet.schedulers, strict=True
            )
        },
        cost=cost,
        approximate_lru_entries=approximate_history(fleet.spec),
        approximate_chunk_tokens=APPROXIMATE_CHUNK_TOKENS,
        routers=fleet.spec.routers,
    )


# Event order at equal times: steps end first (they free blocks), then faults, then arrivals.
_STEP, _FAULT, _ARRIVAL = 0, 1, 2


def simulate(
    fleet: Fleet,
    policy: Policy,
    requests: Sequence[SimRequest],
    *,
    qps: float,
    workload: str,
    faults: Sequence[FaultAction] = (),
    progress: Callable[[int], None] | None = None,
) -> RunRecord:
    """Run ``requests`` through ``fleet`` routed by ``policy``; returns the raw record."""
    started = time.perf_counter()
    record = RunRecord(policy.name, qps, workload, list(fleet.pods))
    schedulers = fleet.schedulers
    generation = [0] * len(schedulers)  # a restart makes the pod's planned step stale
    # (time, kind, order, payload): payload is the request / fault index, or (for a step) the
    # pod number; a step's entry also remembers the pod's generation when it was planned.
    heap: list[tuple[float, int, int, int]] = [
        (request.arrival, _ARRIVAL, n, n) for n, request in enumerate(requests)
    ]
    heap.extend((action.at, _FAULT, n, n) for n, action in enumerate(faults))
    heapq.heapify(heap)
    order = len(heap)
    step_generation: dict[int, int] = {}

    def collect(scheduler: PodScheduler) -> None:
        for job in scheduler.finished:
            record.prompt_tokens.append(len(job.prompt))
            record.cached_tokens.append(job.cached_tokens)
            record.ttft.append(job.first_token - job.arrival)
            record.output_tokens += len(job.output)
            record.last_finish = max(record.last_finish, job.finished)
        scheduler.finished.clear()
        record.rejected += len(scheduler.rejected)
        scheduler.rejected.clear()

    def plan(number: int) -> None:
        nonlocal order
        scheduler = schedulers[number]
        if not scheduler.idle or not scheduler.has_work():
            return
        try:
            step = scheduler.begin_step(fleet.now)
        except PoolExhaustedError:  # the admission estimate fell short: counted, never fatal
            log.warning("pod %s: a request did not fit the block pool", fleet.pods[number])
            step = None
        if step is not None:
            order += 1
            heapq.heappush(heap, (step.ends, _STEP, order, number))
            step_generation[order] = generation[number]
        collect(scheduler)

    while heap:
        at, kind, item_order, item = heapq.heappop(heap)
        fleet.observe(at)
        fleet.now = max(fleet.now, at)
        if kind == _STEP:
            if step_generation.pop(item_order, -1) != generation[item]:
                continue  # planned before the pod restarted
            scheduler = schedulers[item]
            scheduler.end_step()
            collect(scheduler)
            plan(item)
        elif kind == _FAULT:
            action = faults[item]
            fleet.apply_fault(action, record)
            if action.kind == "restart":
                for number in range(len(schedulers)) if action.pod is None else [action.pod]:
                    generation[number] += 1
        else:
            request = requests[item]
            number, expected = _route(fleet, policy, request, record)
            record.first_arrival = min(record.first_arrival, request.arrival)
            job = Job(request.request_id, request.prompt, request.output, request.arrival)
            job.expected_cached = expected
            schedulers[number].submit(job)
            plan(number)
            if progress is not None:
                progress(1)
    record.sync_timeouts = fleet.sync_timeouts
    record.preemptions = sum(scheduler.preemptions for scheduler in schedulers)
    record.ingest = fleet.ingest_statistics()
    record.publishers = fleet.publisher_statistics()
    record.wall_seconds = time.perf_counter() - started
    return record


def _route(fleet: Fleet, policy: Policy, request: SimRequest, record: RunRecord) -> tuple[int, int]:
    """Decide one request's pod and record how well kvcache knew that pod's cache; returns the
    pod's fleet position and kvcache's predicted cached tokens there."""
    fleet.sync()
    keys = fleet.indexer.block_keys(request.prompt)
    live = fleet.live_loads()
    # The imbalance and KV figures are the truth, not what the routers were shown.
    record.load_samples.append([load.waiting + load.running for load in live])
    record.kv_samples.append(sum(load.kv_usage for load in live) / len(live))
    pod = policy.choose(RouteContext(fleet.now, request, keys, fleet.loads(), live))
    number = fleet.pods.index(pod)
    predicted = fleet.predicted_tokens(keys, len(request.prompt), pod)
    truth = fleet.engines[number].cached_tokens(request.prompt)
    record.decisions.append(Decision(fleet.now, pod, predicted, truth))
    return number, predicted


__all__ = [
    "APPROXIMATE_CHUNK_TOKENS",
    "DEFAULT_SCRAPE_INTERVAL",
    "FaultAction",
    "Fleet",
    "FleetSpec",
    "TruePod",
    "approximate_history",
    "build_policy",
    "cost_model",
    "pod_name",
    "simulate",
]
