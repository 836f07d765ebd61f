"""What one simulated run measured: per-request records and their summary figures."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec
import numpy as np


@dataclass(slots=True)
class Decision:
    """One routing decision and whether kvcache predicted the chosen pod's cache exactly."""

    t: float
    pod: str
    predicted_tokens: int
    """kvcache's confirmed view (engine events only, speculative credits left out)."""
    engine_tokens: int
    """What the chosen engine holds for the prompt at that instant (`SimEngine.cached_tokens`)."""

    @property
    def exact(self) -> bool:
        """The prediction equals the engine's truth."""
        return self.predicted_tokens == self.engine_tokens


@dataclass(slots=True)
class RunRecord:
    """Raw outcome of one run (policy x rate x workload)."""

    policy: str
    qps: float
    workload: str
    pods: list[str]
    prompt_tokens: list[int] = field(default_factory=list)
    cached_tokens: list[int] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    output_tokens: int = 0
    first_arrival: float = math.inf
    last_finish: float = 0.0
    decisions: list[Decision] = field(default_factory=list)
    load_samples: list[list[int]] = field(default_factory=list)
    """Per decision, each pod's queued + running requests (fleet order)."""
    kv_samples: list[float] = field(default_factory=list)
    """Per decision, the fleet's mean KV usage."""
    aborted: int = 0
    rejected: int = 0
    sync_timeouts: int = 0
    preemptions: int = 0
    """Running requests the engines preempted (recompute) because their KV pool ran dry."""
    ingest: dict[str, int] = field(default_factory=dict)
    publishers: dict[str, int] = field(default_factory=dict)
    wall_seconds: float = 0.0


class RunSummary(msgspec.Struct, frozen=True):
    """One row of results.json / results.csv (times in seconds)."""

    policy: str
    qps: float
    workload: str
    requests: int
    completed: int
    hit_rate: float
    """Fraction of prompt tokens (of admitted requests) served from the prefix cache."""
    ttft_p50: float
    ttft_p90: float
    ttft_p99: float
    ttft_mean: float
    throughput: float
    """Output tokens per simulated second, first arrival to last completion."""
    load_imbalance: float
    """Busiest pod's mean (queued + running) over the fleet's mean, sampled at arrivals."""
    prediction_accuracy: float
    """Fraction of decisions where kvcache's predicted cached tokens for the chosen pod equal
    the engine's at that instant."""
    mean_kv_usage: float
    aborted: int
    rejected: int
    sync_timeouts: int
    preemptions: int
    event_messages: int
    gaps: int
    resets: int
    wall_seconds: float


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (linear interpolation); NaN for no values."""
    if not values:
        return math.nan
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def summarize(record: RunRecord) -> RunSummary:
    """The figures of a run."""
    prompt = sum(record.prompt_tokens)
    hit = sum(record.cached_tokens) / prompt if prompt else 0.0
    span = record.last_finish - record.first_arrival
    throughput = record.output_tokens / span if span > 0 else 0.0
    imbalance = 1.0
    if record.load_samples:
        means = np.asarray(record.load_samples, dtype=np.float64).mean(axis=0)
        if means.mean() > 0:
            imbalance = float(means.max() / means.mean())
    decisions = record.decisions
    accuracy = sum(d.exact for d in decisions) / len(decisions) if decisions else 1.0
    ttft = record.ttft
    return RunSummary(
        policy=record.policy,
        qps=record.qps,
        workload=record.workload,
        requests=len(decisions),
        completed=len(ttft),
        hit_rate=hit,
        ttft_p50=percentile(ttft, 50),
        ttft_p90=percentile(ttft, 90),
        ttft_p99=percentile(ttft, 99),
        ttft_mean=float(np.mean(ttft)) if ttft else math.nan,
        throughput=throughput,
        load_imbalance=imbalance,
        prediction_accuracy=accuracy,
        mean_kv_usage=float(np.mean(record.kv_samples)) if record.kv_samples else 0.0,
        aborted=record.aborted,
        rejected=record.rejected,
        sync_timeouts=record.sync_timeouts,
        preemptions=record.preemptions,
        event_messages=record.ingest.get("messages", 0),
        gaps=record.ingest.get("gaps", 0),
        resets=record.ingest.get("resets", 0),
        wall_seconds=record.wall_seconds,
    )


class AccuracyPoint(msgspec.Struct, frozen=True):
    """Prediction accuracy of the decisions in one window of simulated time."""

    t: float
    """Window start (simulated seconds)."""
    accuracy: float
    decisions: int


def accuracy_timeline(decisions: Sequence[Decision], window: float) -> list[AccuracyPoint]:
    """Accuracy per ``window`` seconds (empty windows left out)."""
    if window <= 0:
        raise ValueError("window must be > 0")
    buckets: dict[int, list[bool]] = {}
    for decision in decisions:
        buckets.setdefault(int(decision.t // window), []).append(decision.exact)
    return [
        AccuracyPoint(n * window, sum(flags) / len(flags), len(flags))
        for n, flags in sorted(buckets.items())
    ]


def recovery_seconds(decisions: Sequence[Decision], since: float) -> float | None:
    """Simulated seconds from ``since`` to the last wrong prediction after it (0 when none);
    None when predictions are still wrong at the very end (never recovered)."""
    after = [d for d in decisions if d.t >= since]
    wrong = [d.t for d in after if not d.exact]
    if not wrong:
        return 0.0
    if after and not after[-1].exact:
        return None
    return max(wrong) - since
