"""The timing model of one simulated vLLM pod: continuous batching with chunked prefill.

An engine step runs every request in the batch once: each decoding request produces one token
and prefilling requests advance by a share of the step's token budget (vLLM's chunked prefill,
``max_num_batched_tokens``). A step lasts::

    step_overhead + kv_read_per_token * context tokens of the batch
                  + prefill_per_token * prompt tokens prefilled in this step

so a long uncached prompt stretches every step it is part of (the decoders wait for it), and a
cache hit shortens both the request's own prefill and its neighbours' steps. Requests queue
FIFO and are admitted at a step boundary while the batch has room (``max_running``) and the
engine's block pool can hold the prompt's new blocks; the prefix cache is looked up at
admission, as vLLM's scheduler does. Decoding requests take a block when a token starts one;
when none is free, vLLM v1 preempts the most recently admitted request (recompute: its blocks
are freed and it goes back to the front of the queue). Calibration: docs/simulator.md.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Protocol

import msgspec

from kvcache.sim.engine import PoolExhaustedError

PositiveFloat = Annotated[float, msgspec.Meta(gt=0.0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0.0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]


class TimingModel(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Seconds per unit of engine work: an 8B-class model in bf16 on one H100-class GPU.

    Order-of-magnitude figures from vLLM's public serving benchmarks and the hardware's roofline
    (docs/simulator.md); replace them with values measured on your own fleet.
    """

    prefill_per_token: NonNegativeFloat = 6.25e-5
    """Seconds to prefill one uncached prompt token: 1 / prefill throughput (16,000 tokens/s,
    compute bound: ~16 GFLOP per token of an 8B model at ~30% of an H100's bf16 peak)."""
    step_overhead: NonNegativeFloat = 0.006
    """Fixed seconds per engine step: reading the weights once (16 GB at ~3.3 TB/s ~ 5 ms)
    plus scheduling; vLLM's inter-token latency of an 8B model at batch 1 is ~6-8 ms."""
    kv_read_per_token: NonNegativeFloat = 4e-8
    """Seconds per step per token of context in the batch: attention reads each token's KV
    (128 KiB for Llama-3-8B in bf16) once per step at ~3.3 TB/s."""
    max_running: PositiveInt = 256
    """Requests in the running batch at most (vLLM's ``max_num_seqs``)."""
    max_batched_tokens: PositiveInt = 8192
    """Tokens one step processes at most, decodes first (vLLM's ``max_num_batched_tokens``)."""
    reserve_decode_blocks: bool = False
    """Admit a request only when its prompt and all its future decode blocks fit, and never
    preempt (the simulator's earlier, conservative model). Default: vLLM v1's rule, where
    admission needs only the prompt's blocks and a running request that finds no free block
    for its next token preempts the most recently admitted one."""

    def __post_init__(self) -> None:
        # msgspec checks constraints only when decoding; direct construction is checked here.
        for name in ("prefill_per_token", "step_overhead", "kv_read_per_token"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"timing.{name} must be a finite number >= 0, got {value!r}")
        if self.step_overhead == 0 and self.prefill_per_token == 0:
            raise ValueError("timing: step_overhead and prefill_per_token cannot both be 0")
        if not isinstance(self.reserve_decode_blocks, bool):
            raise ValueError(
                f"timing.reserve_decode_blocks must be true or false, "
                f"got {self.reserve_decode_blocks!r}"
            )
        for name in ("max_running", "max_batched_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"timing.{name} must be an integer >= 1, got {value!r}")

    def step_seconds(self, context_tokens: int, prefill_tokens: int) -> float:
        """Duration of one step over this much context, prefilling this many tokens."""
        return (
            self.step_overhead
            + self.kv_read_per_token * context_tokens
            + self.prefill_per_token * prefill_tokens
        )


_FLAGS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse_timing(pairs: Sequence[str], base: TimingModel | None = None) -> TimingModel:
    """``["prefill_per_token=5e-5", ...]`` applied over ``base`` (ValueError names the bad one)."""
    fields = msgspec.structs.asdict(base or TimingModel())
    for pair in pairs:
        name, sep, text = pair.partition("=")
        name = name.strip()
        if not sep or name not in fields:
            known = ", ".join(fields)
            raise ValueError(f"--timing {pair!r}: expected NAME=VALUE with NAME one of {known}")
        if isinstance(fields[name], bool):
            flag = _FLAGS.get(text.strip().lower())
            if flag is None:
                raise ValueError(f"--timing {pair!r}: {text!r} is not true or false")
            fields[name] = flag
            continue
        try:
            value: float = int(text) if isinstance(fields[name], int) else float(text)
        except ValueError:
            raise ValueError(f"--timing {pair!r}: {text!r} is not a number") from None
        fields[name] = value
    return TimingModel(**fields)


class CacheEngine(Protocol):
    """What the scheduler needs of a pod's prefix cache (`kvcache.sim.engine.SimEngine`)."""

    @property
    def block_size(self) -> int: ...
    @property
    def capacity_blocks(self) -> int: ...
    @property
    def used_blocks(self) -> int: ...
    @property
    def free_blocks(self) -> int: ...
    def blocks_needed(self, tokens: Sequence[int]) -> int: ...
    def start(self, request_id: str, tokens: Sequence[int], output: Sequence[int] = ()) -> int: ...
    def decode(self, request_id: str, count: int = 1) -> bool: ...
    def preempt(self, request_id: str) -> None: ...
    def finish(self, request_id: str, output_tokens: Sequence[int] = ()) -> None: ...


@dataclass(slots=True, eq=False)
class Job:
    """One request's life on a pod (times are simulated seconds)."""

    request_id: str
    prompt: Sequence[int]
    output: Sequence[int]
    arrival: float
    admitted: float = math.nan
    first_token: float = math.nan
    finished: float = math.nan
    cached_tokens: int = 0
    """Prompt tokens the prefix cache held at the first admission (vLLM's num_cached_tokens)."""
    prefill_left: int = 0
    reserved_blocks: int = 0
    aborted: bool = False
    expected_cached: int = 0
    """Cached tokens the router expected on this pod when it routed the request (what a router
    that tracks its decisions knows of the queue's work before admission)."""
    generated: int = 0
    """Outputs generated before the last preemption: a resumed request prefills them too."""
    preemptions: int = 0
    fed: int = 0
    """Outputs the engine has computed the KV of since the last admission."""
    # Scheduler bookkeeping for the current admission: its key (-1 when not admitted), the
    # step its prefill ended and its share of the decoding context.
    live_key: int = -1
    decode_start: int = 0
    context_part: int = 0


@dataclass(slots=True)
class StepPlan:
    """A step in progress: when it ends and what it completes then."""

    ends: float
    prefilled: list[Job] = field(default_factory=list)
    """Jobs whose prefill completes in this step: their first token comes at its end."""


class PodScheduler:
    """vLLM's scheduler loop for one pod, driven by a discrete-event loop.

    The loop calls `submit` on arrival, `begin_step` when the pod is idle and has work (or a
    step just ended), and `end_step` at the planned end time.

    By default it follows vLLM v1's scheduler: a step first gives every running request the
    blocks its new token needs; when the pool runs dry the most recently admitted running
    request is preempted (its blocks freed, back to the front of the queue, to recompute its
    prompt and generated tokens later), and no request is admitted in a step that preempted.
    A waiting request is admitted when its prompt's new blocks fit. With
    ``timing.reserve_decode_blocks`` it instead reserves each request's decode blocks at
    admission and never preempts (the conservative model).
    """

    def __init__(self, engine: CacheEngine, timing: TimingModel) -> None:
        self.engine = engine
        self.timing = timing
        self.waiting: deque[Job] = deque()
        self.prefilling: list[Job] = []
        # (finishing step, decode order, job): decoding jobs, earliest finish first.
        self._decoding: list[tuple[int, int, Job]] = []
        self._order = 0
        self._step = 0
        # Context tokens of the decoding jobs = _context_base + len(_decoding) * _step.
        self._context_base = 0
        self._reserved = 0
        self._blocked_free = -1  # the free-block count when the queue's head last did not fit
        # Admitted jobs in admission order (vLLM's running list: the last is preempted first).
        self._live: dict[Job, None] = {}
        # step -> (live key, job): decoding jobs whose token in that step starts or fills a
        # block, the only steps that change the pool (the others are not told to the engine).
        self._due: dict[int, list[tuple[int, Job]]] = {}
        self.plan: StepPlan | None = None
        self.finished: list[Job] = []
        """Jobs completed since the caller last emptied this list."""
        self.rejected: list[Job] = []
        """Jobs that can never fit the block pool (prompt + output beyond its capacity)."""
        self.preemptions = 0
        """Requests preempted so far."""
        self.busy_seconds = 0.0

    # -- load as a router sees it --------------------------------------------------------------

    @property
    def running(self) -> int:
        """Requests in the batch (vLLM's ``num_requests_running``)."""
        return len(self.prefilling) + len(self._decoding)

    @property
    def queued(self) -> int:
        """Requests waiting for admission (vLLM's ``num_requests_waiting``)."""
        return len(self.waiting)

    @property
    def kv_usage(self) -> float:
        """Fraction of blocks held by running requests (cached free blocks count as free)."""
        capacity = self.engine.capacity_blocks
        return min(1.0, self.engine.used_blocks / capacity) if capacity else 0.0

    @property
    def reserves_decode_blocks(self) -> bool:
        """Whether admission holds back a request's decode blocks (no preemption)."""
        return self.timing.reserve_decode_blocks

    @property
    def queued_prefill_tokens(self) -> int:
        """Prompt tokens to prefill before a new request's: what the admitted requests have left
        and the waiting ones' expected uncached tokens."""
        left = sum(job.prefill_left for job in self.prefilling)
        return left + sum(
            len(job.prompt) + job.generated - job.expected_cached for job in self.waiting
        )

    def predict_ttft(self, now: float, *, uncached: int, blocks: int) -> float:
        """Seconds until a request submitted now gets its first token, if nothing else arrives.

        From the true state: the rest of the step in progress, then (if the pool cannot hold
        the waiting requests' blocks and this one's ``blocks``: its new prompt blocks, plus
        its decode reserve when admission reserves them) the steps until enough decoders
        finish, then the prefill work ahead and its own ``uncached`` tokens in chunked steps.
        Steps are priced at the batch's current context; the queue's cached tokens are the
        router's expectation.
        """
        timing = self.timing
        seconds = max(0.0, self.plan.ends - now) if self.plan is not None else 0.0
        size = self.engine.block_size
        need = blocks
        for job in self.waiting:
            tokens = len(job.prompt) + job.generated
            prompt_blocks = self._blocks(tokens)
            need += prompt_blocks - job.expected_cached // size
            if self.reserves_decode_blocks:
                need += self._blocks(len(job.prompt) + len(job.output)) - prompt_blocks + 1
        free = self.engine.free_blocks - self._reserved
        wait_steps = 0
        if need > free:
            # Decoders release their own blocks (and any decode reserve) when they finish.
            for finish_step, _, job in sorted(self._decoding):
                # With the reserve the engine takes decode blocks only when the job finishes.
                held = len(job.prompt)
                if not self.reserves_decode_blocks:
                    held += job.generated + 1 + self._step - job.decode_start
                free += job.reserved_blocks + self._blocks(held)
                free -= job.cached_tokens // size
                wait_steps = finish_step - self._step
                if free >= need:
                    break
        decoders = len(self._decoding)
        context = self._context_base + decoders * self._step
        context += sum(self._tokens(job) - job.prefill_left for job in self.prefilling)
        step = timing.step_overhead + timing.kv_read_per_token * context
        work = self.queued_prefill_tokens + uncached
        budget = max(1, timing.max_batched_tokens - decoders)
        steps = wait_steps + max(1, -(-work // budget))
        return seconds + steps * step + work * timing.prefill_per_token

    @property
    def idle(self) -> bool:
        """No step in progress."""
        return self.plan is None

    def has_work(self) -> bool:
        """Anything to run or admit."""
        return bool(self.waiting or self.prefilling or self._decoding)

    # -- the loop ---------------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue a request (admitted at the next step boundary)."""
        self.waiting.append(job)

    def begin_step(self, now: float) -> StepPlan | None:
        """Give the running requests their blocks, admit what fits, plan the next step; None
        when there is nothing to run."""
        # vLLM schedules the running requests first and admits none in a step that preempted.
        if not self._allocate_decode_blocks(now):
            self._admit(now)
        if not self.prefilling and not self._decoding:
            return None
        budget = self.timing.max_batched_tokens - len(self._decoding)
        prefilled: list[Job] = []
        prefill_tokens = 0
        context = self._context_base + len(self._decoding) * self._step
        for job in self.prefilling:
            done = self._tokens(job) - job.prefill_left
            context += done
            if budget <= 0:
                continue
            take = min(job.prefill_left, budget)
            budget -= take
            prefill_tokens += take
            job.prefill_left -= take
            if job.prefill_left == 0:
                prefilled.append(job)
        seconds = self.timing.step_seconds(context, prefill_tokens)
        self.busy_seconds += seconds
        self.plan = StepPlan(now + seconds, prefilled)
        return self.plan

    def end_step(self) -> float:
        """Complete the planned step: first tokens, finished requests; returns its end time."""
        plan = self.plan
        assert plan is not None, "end_step without a step in progress"
        self.plan = None
        now = plan.ends
        self._step += 1
        if plan.prefilled:
            done = set(map(id, plan.prefilled))
            self.prefilling = [job for job in self.prefilling if id(job) not in done]
        for job in plan.prefilled:
            if math.isnan(job.first_token):
                job.first_token = now
            # The prefill step produced an output token; each later step one more.
            remaining = max(0, len(job.output) - job.generated - 1)
            if remaining == 0:
                self._finish(job, now)
                continue
            self._order += 1
            heapq.heappush(self._decoding, (self._step + remaining, self._order, job))
            job.decode_start = self._step
            # Its context at step s is its tokens + 1 + (s - decode_start).
            job.context_part = self._tokens(job) + 1 - self._step
            self._context_base += job.context_part
            if not self.reserves_decode_blocks:
                self._schedule_due(job, self._step)
        while self._decoding and self._decoding[0][0] <= self._step:
            _, _, job = heapq.heappop(self._decoding)
            self._context_base -= job.context_part
            self._finish(job, now)
        return now

    def abort_all(self, now: float) -> list[Job]:
        """The pod's process died: every admitted or queued request is lost (returned)."""
        lost = [*self.prefilling, *(job for _, _, job in self._decoding), *self.waiting]
        for job in lost:
            job.aborted = True
            job.finished = now
            job.live_key = -1
        self.waiting.clear()
        self.prefilling.clear()
        self._decoding.clear()
        self._live.clear()
        self._due.clear()
        self._context_base = 0
        self._reserved = 0
        self._blocked_free = -1
        self.plan = None
        return lost

    # -- internals --------------------------------------------------------------------------------

    def _blocks(self, tokens: int) -> int:
        return -(-tokens // self.engine.block_size)

    @staticmethod
    def _tokens(job: Job) -> int:
        """Tokens the job prefills when admitted: its prompt and what it generated before."""
        return len(job.prompt) + job.generated

    def _schedule_due(self, job: Job, step: int) -> None:
        """Register the next step from ``step`` on whose token starts or fills a block."""
        size = self.engine.block_size
        # In the step planned at _step == s the job feeds the token at this position.
        position = self._tokens(job) + step - job.decode_start
        last = job.decode_start + len(job.output) - job.generated - 2  # feeds all but the last
        offset = position % size
        if offset not in (0, size - 1):
            step += size - 1 - offset
        if step <= last:
            self._due.setdefault(step, []).append((job.live_key, job))

    def _allocate_decode_blocks(self, now: float) -> bool:
        """The running requests' blocks for this step; True when one had to be preempted."""
        due = self._due.pop(self._step, None)
        if not due:
            return False
        preempted = False
        due.sort(key=lambda entry: entry[0])  # vLLM walks the running list in admission order
        for key, job in due:
            if job.live_key != key:
                continue  # preempted (or aborted) since it was registered
            fed = self._step - job.decode_start + 1  # outputs fed once this step is done
            while not self.engine.decode(job.request_id, fed - job.fed):
                victim = next(reversed(self._live))
                self._preempt(victim, now)
                preempted = True
                if victim is job:
                    break
            if job.live_key == key:
                job.fed = fed
                self._schedule_due(job, self._step + 1)
        return preempted

    def _preempt(self, job: Job, now: float) -> None:
        """vLLM's preemption by recompute: free the blocks, back to the front of the queue."""
        self.engine.preempt(job.request_id)
        del self._live[job]
        if job in self.prefilling:
            self.prefilling.remove(job)
            job.prefill_left = 0
        else:
            self._decoding = [entry for entry in self._decoding if entry[2] is not job]
            heapq.heapify(self._decoding)
            self._context_base -= job.context_part
            # Before this step it had produced one token at its prefill and one per step.
            job.generated += self._step - job.decode_start + 1
        job.live_key = -1
        job.fed = 0
        job.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(job)
        self._blocked_free = -1  # a new head

    def _admit(self, now: float) -> None:
        limit = self.timing.max_running
        reserve = self.reserves_decode_blocks
        while self.waiting and self.running < limit:
            job = self.waiting[0]
            prompt_blocks = self._blocks(self._tokens(job))
            # With the reserve: the blocks the decode will take later, held back now so a
            # running request never runs out.
            total_blocks = self._blocks(len(job.prompt) + len(job.output))
            decode_blocks = total_blocks - prompt_blocks + 1 if reserve else 0
            if total_blocks + 1 > self.engine.capacity_blocks:
                self.waiting.popleft()
                job.aborted = True
                job.finished = now
                self.rejected.append(job)
                self._blocked_free = -1  # a new head
                continue
            free = self.engine.free_blocks - self._reserved - decode_blocks
            if free < prompt_blocks and not self._fits(job, free):
                break  # FIFO: the head waits for blocks, the rest wait behind it
            tokens = [*job.prompt, *job.output[: job.generated]]
            try:
                if reserve:
                    cached = self.engine.start(job.request_id, tokens)
                else:
                    cached = self.engine.start(job.request_id, tokens, job.output[job.generated :])
            except PoolExhaustedError:
                self._blocked_free = self.engine.free_blocks
                break
            self.waiting.popleft()
            if job.preemptions == 0:
                job.admitted = now
                job.cached_tokens = cached
            job.prefill_left = len(tokens) - cached
            job.reserved_blocks = decode_blocks
            self._reserved += decode_blocks
            self._order += 1
            job.live_key = self._order
            self._live[job] = None
            self.prefilling.append(job)

    def _fits(self, job: Job, free: int) -> bool:
        """Whether the prompt's new blocks (its prefix hits need none) fit in ``free``."""
        # Asking the engine hashes the prompt: skip it while the pool has not changed since
        # the head last failed to fit.
        if self.engine.free_blocks == self._blocked_free:
            return False
        tokens = [*job.prompt, *job.output[: job.generated]] if job.generated else job.prompt
        if self.engine.blocks_needed(tokens) <= free:
            return True
        self._blocked_free = self.engine.free_blocks
        return False

    def _finish(self, job: Job, now: float) -> None:
        job.finished = now
        self._reserved -= job.reserved_blocks
        job.live_key = -1
        self._live.pop(job, None)
        self.engine.finish(job.request_id, job.output if self.reserves_decode_blocks else ())
        self.finished.append(job)
