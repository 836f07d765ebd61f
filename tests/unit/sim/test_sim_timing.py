"""The pod timing model: step durations, chunked prefill, admission, prefix hits, rejection."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest

from kvcache.events.schema import BlockRemoved, BlockStored
from kvcache.hashing import make_scheme
from kvcache.sim.engine import SimEngine
from kvcache.sim.timing import Job, PodScheduler, TimingModel, parse_timing
from kvcache.sim.wire import ListSink

BS = 16


def engine(num_blocks: int = 512) -> SimEngine:
    return SimEngine(
        "pod", block_size=BS, num_blocks=num_blocks, scheme=make_scheme("sha256"), sink=ListSink()
    )


def run(scheduler: PodScheduler, now: float = 0.0) -> float:
    """Step the pod until it is idle; returns the time it got there."""
    while scheduler.has_work():
        plan = scheduler.begin_step(now)
        if plan is None:
            break
        now = scheduler.end_step()
    return now


def job(name: str, prompt: Sequence[int], output: int, arrival: float = 0.0) -> Job:
    return Job(name, list(prompt), list(range(7, 7 + output)), arrival)


def test_one_request_timeline_follows_the_step_formula() -> None:
    timing = TimingModel(
        prefill_per_token=1e-4, step_overhead=0.01, kv_read_per_token=1e-6, max_running=8
    )
    scheduler = PodScheduler(engine(), timing)
    prompt = list(range(1000, 1100))  # 100 tokens, nothing cached
    request = job("a", prompt, output=4)
    scheduler.submit(request)
    end = run(scheduler)
    # Step 1 prefills all 100 tokens (no context yet) and yields the first token.
    first = 0.01 + 100 * 1e-4
    assert request.first_token == pytest.approx(first)
    # Three decode steps follow, over a context of 101, 102 and 103 tokens.
    decode = sum(0.01 + (100 + k) * 1e-6 for k in (1, 2, 3))
    assert request.finished == pytest.approx(first + decode)
    assert end == pytest.approx(first + decode)
    assert request.cached_tokens == 0
    assert scheduler.finished == [request]


def test_a_repeated_prompt_hits_the_cache_and_prefills_only_the_rest() -> None:
    timing = TimingModel(prefill_per_token=1e-3, step_overhead=0.0, kv_read_per_token=0.0)
    scheduler = PodScheduler(engine(), timing)
    prompt = list(range(5000, 5000 + 4 * BS))  # exactly 4 blocks
    first = job("a", prompt, output=1)
    scheduler.submit(first)
    done = run(scheduler)
    second = job("b", prompt, output=1, arrival=done)
    scheduler.submit(second)
    run(scheduler, done)
    # vLLM recomputes the last prompt token, so the last full block never counts as a hit.
    assert second.cached_tokens == 3 * BS
    assert second.first_token - done == pytest.approx(BS * 1e-3)
    assert first.first_token == pytest.approx(4 * BS * 1e-3)


def test_chunked_prefill_spreads_a_long_prompt_over_budgeted_steps() -> None:
    timing = TimingModel(
        prefill_per_token=1e-4, step_overhead=0.01, kv_read_per_token=0.0, max_batched_tokens=64
    )
    scheduler = PodScheduler(engine(), timing)
    request = job("a", list(range(200, 400)), output=1)  # 200 tokens: 64 + 64 + 64 + 8
    scheduler.submit(request)
    run(scheduler)
    assert request.first_token == pytest.approx(4 * 0.01 + 200 * 1e-4)


def test_max_running_makes_the_second_request_wait_fifo() -> None:
    timing = TimingModel(
        prefill_per_token=0.0, step_overhead=0.01, kv_read_per_token=0.0, max_running=1
    )
    scheduler = PodScheduler(engine(), timing)
    a = job("a", list(range(100, 120)), output=3)
    b = job("b", list(range(300, 320)), output=3)
    scheduler.submit(a)
    scheduler.submit(b)
    assert scheduler.queued == 2
    scheduler.begin_step(0.0)
    assert (scheduler.running, scheduler.queued) == (1, 1)
    run_end = run_rest(scheduler)
    assert a.finished == pytest.approx(0.03)
    assert b.admitted == pytest.approx(0.03)  # admitted at the step boundary after a finished
    assert b.first_token == pytest.approx(0.04)
    assert run_end == pytest.approx(0.06)


def run_rest(scheduler: PodScheduler) -> float:
    now = scheduler.end_step()
    return run(scheduler, now)


def test_a_request_larger_than_the_pool_is_rejected_not_fatal() -> None:
    scheduler = PodScheduler(engine(num_blocks=5), TimingModel())  # 4 usable blocks
    big = job("big", list(range(100, 100 + 10 * BS)), output=4)
    small = job("small", list(range(900, 910)), output=2)
    scheduler.submit(big)
    scheduler.submit(small)
    run(scheduler)
    assert scheduler.rejected == [big] and big.aborted
    assert small in scheduler.finished and not math.isnan(small.first_token)


def test_reserving_decode_blocks_keeps_the_head_waiting_until_blocks_free() -> None:
    timing = TimingModel(
        prefill_per_token=0.0,
        step_overhead=0.01,
        kv_read_per_token=0.0,
        reserve_decode_blocks=True,
    )
    scheduler = PodScheduler(engine(num_blocks=9), timing)  # 8 usable blocks
    a = job("a", list(range(100, 100 + 3 * BS)), output=BS)  # 3 prompt + 2 decode blocks
    b = job("b", list(range(500, 500 + 3 * BS)), output=BS)
    scheduler.submit(a)
    scheduler.submit(b)
    scheduler.begin_step(0.0)
    assert (scheduler.running, scheduler.queued) == (1, 1)
    run_rest(scheduler)
    assert b.admitted >= a.finished
    assert scheduler.engine.used_blocks == 0


def test_kv_usage_and_abort_all() -> None:
    scheduler = PodScheduler(engine(num_blocks=11), TimingModel())
    scheduler.submit(job("a", list(range(100, 100 + 2 * BS)), output=5))
    scheduler.submit(job("b", list(range(700, 700 + 2 * BS)), output=5))
    scheduler.begin_step(0.0)
    assert scheduler.kv_usage == pytest.approx(4 / 10)
    lost = scheduler.abort_all(1.0)
    assert sorted(j.request_id for j in lost) == ["a", "b"]
    assert all(j.aborted for j in lost)
    assert not scheduler.has_work() and scheduler.idle


def test_parse_timing_overrides_and_errors() -> None:
    timing = parse_timing(["prefill_per_token=5e-5", "max_running=32"])
    assert timing.prefill_per_token == 5e-5 and timing.max_running == 32
    assert timing.step_overhead == TimingModel().step_overhead
    with pytest.raises(ValueError, match="NAME one of"):
        parse_timing(["nope=1"])
    with pytest.raises(ValueError, match="not a number"):
        parse_timing(["step_overhead=fast"])
    with pytest.raises(ValueError, match="max_running"):
        parse_timing(["max_running=0"])
    with pytest.raises(ValueError, match="step_overhead"):
        TimingModel(step_overhead=-1.0)


def test_queued_prefill_work_and_the_true_ttft_prediction() -> None:
    timing = TimingModel(
        prefill_per_token=1e-4, step_overhead=0.01, kv_read_per_token=0.0, max_running=1
    )
    scheduler = PodScheduler(engine(), timing)
    # Idle pod: one step prefilling the whole prompt, as the step formula says.
    assert scheduler.predict_ttft(0.0, uncached=100, blocks=8) == pytest.approx(0.01 + 0.01)
    first = job("a", range(1000, 1100), output=3)
    scheduler.submit(first)
    scheduler.begin_step(0.0)  # admits a: 100 tokens prefilling this step
    second = job("b", range(2000, 2064), output=3)
    second.expected_cached = 32
    scheduler.submit(second)  # waits: max_running 1
    assert scheduler.queued_prefill_tokens == 0 + 32  # a's prefill is planned in the step
    # A new request waits for the step in progress (0.02 s), then prefills b's 32 expected
    # tokens and its own 50 in one more step.
    predicted = scheduler.predict_ttft(0.0, uncached=50, blocks=5)
    assert predicted == pytest.approx(0.02 + 0.01 + 82 * 1e-4)


def test_a_dry_pool_preempts_the_last_admitted_which_resumes_by_recompute() -> None:
    timing = TimingModel(prefill_per_token=0.0, step_overhead=0.01, kv_read_per_token=0.0)
    pool = engine(num_blocks=9)  # 8 usable blocks
    scheduler = PodScheduler(pool, timing)
    # 3 prompt blocks each; their 39 computed outputs need 3 more blocks each: 12 > 8.
    a = job("a", list(range(100, 100 + 3 * BS)), output=40)
    b = job("b", list(range(500, 500 + 3 * BS)), output=40)
    scheduler.submit(a)
    scheduler.submit(b)
    scheduler.begin_step(0.0)
    # vLLM admits on the prompt's blocks alone: both run (6 of 8 blocks).
    assert (scheduler.running, scheduler.queued) == (2, 0)
    run_rest(scheduler)
    # Both took a decode block at position 48 (the pool's last two); at position 64 a needs
    # one more: b, admitted last, is preempted (LIFO), a is never touched.
    assert (scheduler.preemptions, a.preemptions, b.preemptions) == (1, 0, 1)
    # b had produced its prefill token and one per step for positions 48..63: 17 outputs,
    # which it recomputes with its prompt when resumed.
    assert b.generated == 17
    assert a.finished == pytest.approx(0.40)  # 1 prefill + 39 decode steps, undisturbed
    assert b.first_token == pytest.approx(0.01)  # its first token came before the preemption
    # b resumes when a frees its blocks (0.40): one step re-prefills and yields output 17,
    # then 22 steps for outputs 18..39.
    assert b.finished == pytest.approx(0.63)
    assert pool.used_blocks == 0 and pool.preemptions == 1
    assert isinstance(pool.sink, ListSink)
    events = [event for batch in pool.sink.batches for event in batch]
    stored = [e for e in events if isinstance(e, BlockStored)]
    removed = [e.block_hashes[0] for e in events if isinstance(e, BlockRemoved)]
    (first,) = [e for e in stored if e.token_ids[0] == b.prompt[0]]  # b's first prefill
    # b's decode block (outputs 0..15 after its prompt) was stored, then evicted by a's.
    (b_decode,) = [e for e in stored if e.parent_block_hash == first.block_hashes[-1]]
    assert b_decode.token_ids == b.output[:BS]
    assert b_decode.block_hashes[0] in removed
    # The resumed prefill recomputed what had been evicted (b's last prompt block went too)
    # and stored it under the same keys, its generated tokens included.
    (resumed,) = [e for e in stored if e.token_ids[:BS] == list(b.prompt[2 * BS :])]
    assert resumed.block_hashes == [first.block_hashes[-1], b_decode.block_hashes[0]]
    assert resumed.token_ids == [*b.prompt[2 * BS :], *b.output[:BS]]
    assert stored.index(resumed) > stored.index(b_decode)


def test_parse_timing_reads_the_reserve_flag() -> None:
    assert parse_timing(["reserve_decode_blocks=true"]).reserve_decode_blocks is True
    assert parse_timing(["reserve_decode_blocks=0"]).reserve_decode_blocks is False
    with pytest.raises(ValueError, match="true or false"):
        parse_timing(["reserve_decode_blocks=maybe"])


def test_a_runs_preemptions_reach_its_results_row() -> None:
    from kvcache.sim.results import RunRecord, summarize

    record = RunRecord(policy="precise", qps=1.0, workload="w", pods=["a"], preemptions=3)
    assert summarize(record).preemptions == 3
