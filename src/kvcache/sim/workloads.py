"""Request streams for the simulator: shared-prefix groups, multi-turn chats, a long tail, traces.

Every generator is deterministic for a seed: the same seed gives the same token ids, and the
arrival times of a stream at another rate are the same unit-rate Poisson arrivals rescaled, so
one run's QPS sweep compares the same requests.

Trace format (JSON Lines, one request per line; docs/simulator.md)::

    {"t": 0.25, "session": "u1", "prompt_tokens": [1, 2, 3], "output_len": 64}
    {"t": 0.40, "session": "u2", "prompt_len": 900, "prefix_group": "faq", "output_len": 32}

``t`` is the arrival in seconds. A prompt is either given (``prompt_tokens``) or synthesised
from ``prompt_len``: requests of one ``prefix_group`` share that group's token stream for the
first ``prefix_len`` tokens (default: the whole prompt); a request whose ``session`` sent an
earlier one continues it (its prompt starts with the previous prompt and output) when it is
long enough to; the rest are the request's own tokens. ``output_len`` defaults to 128.
"""

from __future__ import annotations

import bisect
import json
import math
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import numpy as np
import numpy.typing as npt

VOCAB = 32_000
"""Token ids are drawn from [100, VOCAB): a Llama-2-sized vocabulary above special tokens."""
_FIRST_TOKEN = 100

WorkloadName = Literal["shared-prefix", "chat", "long-tail", "trace"]
WORKLOADS: tuple[str, ...] = ("shared-prefix", "chat", "long-tail", "trace")


class SimRequest(msgspec.Struct, frozen=True):
    """One request of a workload."""

    request_id: str
    arrival: float
    """Seconds from the start of the run."""
    prompt: list[int]
    """Prompt token ids."""
    output: list[int]
    """The tokens the engine generates (decided up front so later turns can contain them)."""
    session: str = ""
    prefix_group: str = ""


PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]


class SharedPrefixShape(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """llm-d's shared-prefix benchmark (inference-perf's shared_prefix data), scaled down.

    llm-d's "73-capacity" run: 8 pods of 307,328 KV tokens; 150 groups x 5 prompts, each a
    6,000-token group system prompt + a 1,200-token question, 1,000 output tokens. The distinct
    prompt tokens fill 73% of the fleet's KV (each pod holds a third of the system prompts), so
    the cache cannot hold every group on every pod, and the running requests' KV pushes cached
    prefixes out. The defaults divide every length by the pod-capacity ratio (307,328 / 32,768
    tokens, the simulator's default 2,048 blocks of 16) and the group count by the pod-count
    ratio (8 / 4), which keeps the 73% and the 5 : 1 : 0.83 system : question : output ratios.
    """

    groups: PositiveInt = 75
    prompts_per_group: PositiveInt = 5
    system_len: NonNegativeInt = 640
    question_len: PositiveInt = 128
    output_len: PositiveInt = 107


class ChatShape(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Multi-turn chat sessions: each turn resends the whole history plus a new message."""

    system_prompts: PositiveInt = 4
    system_len: NonNegativeInt = 512
    mean_turns: float = 5.0
    message_len: PositiveInt = 128
    """Median user-message tokens (log-normal)."""
    output_len: PositiveInt = 128
    """Median answer tokens (log-normal)."""
    think_seconds: float = 8.0
    """Mean pause between an answer and the next turn's arrival (exponential)."""
    max_prompt: PositiveInt = 8192
    """A session ends once its history would exceed this many tokens."""


class LongTailShape(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Zipf-popular prefix groups with log-normal lengths: a few hot prefixes, many cold ones."""

    groups: PositiveInt = 200
    zipf_s: float = 1.1
    prefix_len: PositiveInt = 768
    """Median shared-prefix tokens (log-normal, clipped to [16, 4096])."""
    suffix_len: PositiveInt = 128
    """Median own tokens (log-normal, clipped to [1, 2048])."""
    output_len: PositiveInt = 128
    """Median output tokens (log-normal, clipped to [1, 1024])."""


class TraceLine(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One line of a trace file (see the module docstring)."""

    t: float
    session: str = ""
    prompt_tokens: list[int] | None = None
    prompt_len: int | None = None
    prefix_group: str = ""
    prefix_len: int | None = None
    output_len: int = 128


def _tokens(rng: np.random.Generator, count: int) -> list[int]:
    values: npt.NDArray[np.int64] = rng.integers(_FIRST_TOKEN, VOCAB, size=count)
    return [int(v) for v in values.tolist()]


def _stream_rng(seed: int, *names: str) -> np.random.Generator:
    """A generator for one named stream (a group's prefix, a session's tokens) of a seed."""
    label = "\x00".join(names).encode("utf-8")
    return np.random.default_rng([seed, zlib.crc32(label)])


def poisson_arrivals(count: int, qps: float, seed: int) -> list[float]:
    """``count`` arrival times of a Poisson process at ``qps`` (unit-rate gaps, rescaled)."""
    if not (math.isfinite(qps) and qps > 0):
        raise ValueError(f"qps must be a positive number, got {qps!r}")
    gaps = _stream_rng(seed, "arrivals").exponential(1.0, size=count)
    return [float(t) / qps for t in np.cumsum(gaps).tolist()]


def _lognormal(rng: np.random.Generator, median: float, low: int, high: int) -> int:
    return int(min(high, max(low, round(median * math.exp(0.6 * rng.standard_normal())))))


def shared_prefix(
    requests: int, qps: float, seed: int, shape: SharedPrefixShape | None = None
) -> list[SimRequest]:
    """Requests drawn uniformly from groups x prompts: system prompt + question (llm-d's shape)."""
    shape = shape or SharedPrefixShape()
    systems = [
        _tokens(_stream_rng(seed, "system", str(g)), shape.system_len) for g in range(shape.groups)
    ]
    questions: dict[tuple[int, int], list[int]] = {}
    pick = _stream_rng(seed, "pick")
    arrivals = poisson_arrivals(requests, qps, seed)
    result: list[SimRequest] = []
    for number, arrival in enumerate(arrivals):
        group = int(pick.integers(shape.groups))
        prompt_no = int(pick.integers(shape.prompts_per_group))
        question = questions.get((group, prompt_no))
        if question is None:
            rng = _stream_rng(seed, "question", str(group), str(prompt_no))
            question = questions[(group, prompt_no)] = _tokens(rng, shape.question_len)
        output = _tokens(_stream_rng(seed, "output", str(number)), shape.output_len)
        result.append(
            SimRequest(
                f"r{number}",
                arrival,
                systems[group] + question,
                output,
                session=f"g{group}-u{prompt_no}",
                prefix_group=f"g{group}",
            )
        )
    return result


def chat_sessions(
    requests: int, qps: float, seed: int, shape: ChatShape | None = None
) -> list[SimRequest]:
    """Sessions starting as a Poisson process; each turn = history + message, after a pause."""
    shape = shape or ChatShape()
    if shape.mean_turns < 1 or shape.think_seconds < 0:
        raise ValueError("chat: mean_turns must be >= 1 and think_seconds >= 0")
    systems = [
        _tokens(_stream_rng(seed, "chat-system", str(s)), shape.system_len)
        for s in range(shape.system_prompts)
    ]
    # Sessions start at qps / mean_turns so that turns arrive at about qps overall.
    starts = poisson_arrivals(requests, qps / shape.mean_turns, seed)
    turns: list[SimRequest] = []
    arrivals: list[float] = []  # sorted: a session starting after the requests-th turn is moot
    for number, start in enumerate(starts):
        if len(arrivals) >= requests and start > arrivals[requests - 1]:
            break
        rng = _stream_rng(seed, "session", str(number))
        count = int(rng.geometric(1.0 / shape.mean_turns))
        history = list(systems[int(rng.integers(shape.system_prompts))])
        arrival = start
        for turn in range(max(1, count)):
            message = _tokens(rng, _lognormal(rng, shape.message_len, 4, 2048))
            output = _tokens(rng, _lognormal(rng, shape.output_len, 4, 2048))
            prompt = history + message
            if turn and len(prompt) > shape.max_prompt:
                break
            turns.append(
                SimRequest(f"s{number}-t{turn}", arrival, prompt, output, session=f"s{number}")
            )
            bisect.insort(arrivals, arrival)
            history = prompt + output
            # The next turn comes after this one's answer (about its decode time) and a pause.
            arrival += 0.02 * len(output) + float(rng.exponential(shape.think_seconds))
    turns.sort(key=lambda r: r.arrival)
    return _renumber(turns[:requests])


def long_tail(
    requests: int, qps: float, seed: int, shape: LongTailShape | None = None
) -> list[SimRequest]:
    """Zipf-popular groups of different prefix lengths, log-normal suffix and output lengths."""
    shape = shape or LongTailShape()
    if shape.zipf_s <= 0:
        raise ValueError("long-tail: zipf_s must be > 0")
    weights = 1.0 / np.arange(1, shape.groups + 1, dtype=np.float64) ** shape.zipf_s
    weights /= weights.sum()
    pick = _stream_rng(seed, "pick")
    lengths = _stream_rng(seed, "prefix-lengths")
    prefix_lens = [_lognormal(lengths, shape.prefix_len, 16, 4096) for _ in range(shape.groups)]
    prefixes: dict[int, list[int]] = {}
    result: list[SimRequest] = []
    for number, arrival in enumerate(poisson_arrivals(requests, qps, seed)):
        group = int(pick.choice(shape.groups, p=weights))
        prefix = prefixes.get(group)
        if prefix is None:
            rng = _stream_rng(seed, "prefix", str(group))
            prefix = prefixes[group] = _tokens(rng, prefix_lens[group])
        own = _stream_rng(seed, "own", str(number))
        suffix = _tokens(own, _lognormal(own, shape.suffix_len, 1, 2048))
        output = _tokens(own, _lognormal(own, shape.output_len, 1, 1024))
        result.append(
            SimRequest(f"r{number}", arrival, prefix + suffix, output, prefix_group=f"g{group}")
        )
    return result


def _renumber(requests: list[SimRequest]) -> list[SimRequest]:
    """Request ids in arrival order (ids must be unique within a run)."""
    return [
        msgspec.structs.replace(r, request_id=f"{r.request_id}#{n}") for n, r in enumerate(requests)
    ]


# -- traces -----------------------------------------------------------------------------------


def read_trace(path: str | Path, seed: int = 0, limit: int | None = None) -> list[SimRequest]:
    """The requests of a JSONL trace, sorted by arrival; ValueError names the bad line."""
    decoder = msgspec.json.Decoder(TraceLine)
    lines: list[tuple[int, TraceLine]] = []
    try:
        handle = open(path, encoding="utf-8")  # noqa: SIM115 (closed below; errors named)
    except OSError as exc:
        raise ValueError(f"cannot read trace {path}: {exc.strerror}") from None
    with handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                line = decoder.decode(text)
            except msgspec.DecodeError as exc:
                raise ValueError(f"{path}:{number}: {exc}") from None
            _check_line(line, f"{path}:{number}")
            lines.append((number, line))
            if limit is not None and len(lines) >= limit:
                break
    if not lines:
        raise ValueError(f"{path}: no requests")
    return synthesise(lines, seed)


def _check_line(line: TraceLine, where: str) -> None:
    if not (math.isfinite(line.t) and line.t >= 0):
        raise ValueError(f"{where}: t must be a number >= 0, got {line.t}")
    if (line.prompt_tokens is None) == (line.prompt_len is None):
        raise ValueError(f"{where}: give exactly one of prompt_tokens and prompt_len")
    if line.prompt_tokens is not None:
        if not line.prompt_tokens:
            raise ValueError(f"{where}: prompt_tokens is empty")
        bad = next((t for t in line.prompt_tokens if not 0 <= t < 2**32), None)
        if bad is not None:
            raise ValueError(f"{where}: token id {bad} is not an unsigned 32-bit integer")
    if line.prompt_len is not None and line.prompt_len < 1:
        raise ValueError(f"{where}: prompt_len must be >= 1, got {line.prompt_len}")
    if line.prefix_len is not None and line.prefix_len < 0:
        raise ValueError(f"{where}: prefix_len must be >= 0, got {line.prefix_len}")
    if line.output_len < 1:
        raise ValueError(f"{where}: output_len must be >= 1, got {line.output_len}")


def synthesise(lines: Iterable[tuple[int, TraceLine]], seed: int) -> list[SimRequest]:
    """Trace lines -> requests (prompts from ``prompt_len`` built as the format describes)."""
    ordered = sorted(lines, key=lambda item: (item[1].t, item[0]))
    streams: dict[str, list[int]] = {}
    history: dict[str, list[int]] = {}
    result: list[SimRequest] = []
    for number, line in ordered:
        own = _stream_rng(seed, "trace-line", str(number))
        if line.prompt_tokens is not None:
            prompt = list(line.prompt_tokens)
        else:
            assert line.prompt_len is not None
            prompt = _synthetic_prompt(line, line.prompt_len, streams, history, own, seed)
        output = _tokens(own, line.output_len)
        if line.session:
            history[line.session] = prompt + output
        result.append(
            SimRequest(
                f"l{number}",
                line.t,
                prompt,
                output,
                session=line.session,
                prefix_group=line.prefix_group,
            )
        )
    return result


def _synthetic_prompt(  # noqa: PLR0917 (private)
    line: TraceLine,
    length: int,
    streams: dict[str, list[int]],
    history: dict[str, list[int]],
    own: np.random.Generator,
    seed: int,
) -> list[int]:
    previous = history.get(line.session) if line.session else None
    if previous is not None and len(previous) <= length:
        return previous + _tokens(own, length - len(previous))
    shared = min(length, line.prefix_len if line.prefix_len is not None else length)
    if not line.prefix_group:
        shared = 0
    prompt: list[int] = []
    if shared:
        stream = streams.setdefault(line.prefix_group, [])
        if len(stream) < shared:
            rng = _stream_rng(seed, "trace-group", line.prefix_group, str(len(stream)))
            stream.extend(_tokens(rng, shared - len(stream)))
        prompt = stream[:shared]
    return prompt + _tokens(own, length - shared)


def write_trace(path: str | Path, requests: Sequence[SimRequest]) -> None:
    """Write requests as a trace with explicit tokens (replays exactly with `read_trace`)."""
    with open(path, "w", encoding="utf-8") as out:
        for request in requests:
            line: dict[str, Any] = {
                "t": request.arrival,
                "session": request.session,
                "prompt_tokens": request.prompt,
                "prefix_group": request.prefix_group,
                "output_len": len(request.output),
            }
            out.write(json.dumps(line) + "\n")


def rescale(requests: Sequence[SimRequest], qps: float) -> list[SimRequest]:
    """The same requests with arrival times scaled to a mean rate of ``qps`` (trace replay)."""
    if not (math.isfinite(qps) and qps > 0):
        raise ValueError(f"qps must be a positive number, got {qps!r}")
    if len(requests) < 2:
        return list(requests)
    start = requests[0].arrival
    span = requests[-1].arrival - start
    if span <= 0:
        return list(requests)
    factor = (len(requests) - 1) / qps / span
    return [msgspec.structs.replace(r, arrival=(r.arrival - start) * factor) for r in requests]


def generate(
    name: str,
    requests: int,
    qps: float,
    seed: int,
    *,
    trace: Sequence[SimRequest] | None = None,
) -> list[SimRequest]:
    """The named workload at ``qps`` (a trace is rescaled to it)."""
    if requests < 1:
        raise ValueError(f"requests must be >= 1, got {requests}")
    if name == "shared-prefix":
        return shared_prefix(requests, qps, seed)
    if name == "chat":
        return chat_sessions(requests, qps, seed)
    if name == "long-tail":
        return long_tail(requests, qps, seed)
    if name == "trace":
        if trace is None:
            raise ValueError("the trace workload needs a trace file (--trace FILE)")
        return rescale(trace[:requests], qps)
    raise ValueError(f"unknown workload {name!r}: one of {', '.join(WORKLOADS)}")
