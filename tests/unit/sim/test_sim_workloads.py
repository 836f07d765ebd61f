"""Workloads: determinism, the shapes' sharing structure, arrival rates, the trace format."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from kvcache.sim.workloads import (
    SharedPrefixShape,
    SimRequest,
    chat_sessions,
    generate,
    long_tail,
    poisson_arrivals,
    read_trace,
    rescale,
    shared_prefix,
    write_trace,
)


def test_same_seed_same_requests_other_seed_others() -> None:
    assert shared_prefix(50, 10, seed=1) == shared_prefix(50, 10, seed=1)
    assert shared_prefix(50, 10, seed=1) != shared_prefix(50, 10, seed=2)
    assert chat_sessions(40, 5, seed=3) == chat_sessions(40, 5, seed=3)
    assert long_tail(40, 5, seed=3) == long_tail(40, 5, seed=3)


def test_arrivals_are_one_process_rescaled_by_the_rate() -> None:
    slow = poisson_arrivals(500, 10.0, seed=4)
    fast = poisson_arrivals(500, 20.0, seed=4)
    assert fast == pytest.approx([t / 2 for t in slow])
    assert all(b > a for a, b in itertools.pairwise(slow))
    # 500 exponential gaps: the mean rate is within a few percent of the asked one.
    assert 500 / slow[-1] == pytest.approx(10.0, rel=0.15)
    with pytest.raises(ValueError, match="qps"):
        poisson_arrivals(3, 0.0, seed=0)


def test_shared_prefix_groups_share_exactly_the_system_prompt() -> None:
    shape = SharedPrefixShape(groups=3, prompts_per_group=2, system_len=64, question_len=32)
    requests = shared_prefix(200, 50, seed=0, shape=shape)
    assert {len(r.prompt) for r in requests} == {96}
    assert {len(r.output) for r in requests} == {shape.output_len}
    by_group: dict[str, list[list[int]]] = {}
    for r in requests:
        by_group.setdefault(r.prefix_group, []).append(r.prompt)
    assert len(by_group) == 3
    systems = {group: prompts[0][:64] for group, prompts in by_group.items()}
    for group, prompts in by_group.items():
        assert all(p[:64] == systems[group] for p in prompts)
        # two prompts per group: the questions repeat, so a group has at most 2 distinct prompts
        assert len({tuple(p) for p in prompts}) <= 2
    assert len({tuple(s) for s in systems.values()}) == 3
    assert len({r.request_id for r in requests}) == 200


def test_chat_turns_resend_the_history_with_the_previous_answer() -> None:
    requests = chat_sessions(120, 4, seed=5)
    assert len(requests) == 120
    assert [r.arrival for r in requests] == sorted(r.arrival for r in requests)
    sessions: dict[str, list[SimRequest]] = {}
    for r in requests:
        sessions.setdefault(r.session, []).append(r)
    multi = [turns for turns in sessions.values() if len(turns) > 1]
    assert multi, "some sessions have several turns"
    for turns in multi:
        for earlier, later in itertools.pairwise(turns):
            history = earlier.prompt + earlier.output
            assert later.prompt[: len(history)] == history
            assert later.arrival > earlier.arrival


def test_long_tail_has_hot_and_cold_groups() -> None:
    requests = long_tail(600, 20, seed=6)
    counts: dict[str, int] = {}
    for r in requests:
        counts[r.prefix_group] = counts.get(r.prefix_group, 0) + 1
    ranked = sorted(counts.values(), reverse=True)
    assert ranked[0] >= 5 * ranked[len(ranked) // 2]
    lengths = {len(r.prompt) for r in requests}
    assert len(lengths) > 50  # log-normal lengths, not one shape


def test_trace_round_trip_and_rescale(tmp_path: Path) -> None:
    original = shared_prefix(30, 10, seed=7, shape=SharedPrefixShape(groups=2, system_len=32))
    path = tmp_path / "trace.jsonl"
    write_trace(path, original)
    replayed = read_trace(path)
    assert [r.prompt for r in replayed] == [r.prompt for r in original]
    assert [len(r.output) for r in replayed] == [len(r.output) for r in original]
    assert [r.arrival for r in replayed] == pytest.approx([r.arrival for r in original])
    faster = rescale(replayed, 20.0)
    span = faster[-1].arrival - faster[0].arrival
    assert (len(faster) - 1) / span == pytest.approx(20.0)
    assert generate("trace", 10, 5.0, 0, trace=replayed)[9].prompt == original[9].prompt


def test_trace_prompt_len_follows_groups_and_sessions(tmp_path: Path) -> None:
    lines = [
        {"t": 0.0, "session": "u1", "prompt_len": 40, "prefix_group": "faq", "prefix_len": 32},
        {"t": 0.5, "session": "u2", "prompt_len": 50, "prefix_group": "faq", "prefix_len": 32},
        {"t": 1.0, "session": "u1", "prompt_len": 200, "output_len": 8},
        {"t": 1.2, "session": "u2", "prompt_len": 60},
        {"t": 1.5, "prompt_len": 20},
    ]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    a, b, c, e, d = read_trace(path, seed=1)
    assert a.prompt[:32] == b.prompt[:32]
    assert a.prompt[32:] != b.prompt[32:40]
    assert [len(r.prompt) for r in (a, b, c, e, d)] == [40, 50, 200, 60, 20]
    assert len(a.output) == 128 and len(c.output) == 8
    assert c.prompt[: 40 + 128] == a.prompt + a.output  # u1's second turn continues the first
    # u2's history (50 + 128 tokens) does not fit in 60: a fresh prompt, not a continuation
    assert e.prompt[:50] != b.prompt
    assert d.prompt[:20] != a.prompt[:20]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", ":2:"),
        ('{"t": 0, "prompt_len": 4, "bogus": 1}', "bogus"),
        ('{"t": 0}', "exactly one of"),
        ('{"t": -1, "prompt_len": 4}', "t must be"),
        ('{"t": 0, "prompt_tokens": [1, -2]}', "-2"),
        ('{"t": 0, "prompt_len": 4, "output_len": 0}', "output_len"),
    ],
)
def test_bad_trace_lines_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"t": 0, "prompt_len": 8}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        read_trace(path)


def test_generate_rejects_unknown_names_and_missing_traces(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown workload"):
        generate("nope", 10, 1.0, 0)
    with pytest.raises(ValueError, match="trace file"):
        generate("trace", 10, 1.0, 0)
    with pytest.raises(ValueError, match="cannot read"):
        read_trace(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no requests"):
        read_trace(empty)
