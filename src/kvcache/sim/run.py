"""`kvcache sim`: compare routing policies on a simulated fleet, then show self-healing.

One run per (policy, QPS) on a fresh fleet and a fresh in-process kvcache, all on the same
requests (the workload is regenerated with the same seed at each rate). Then the self-healing
demo: the ``precise`` policy with event loss on one pod, that pod restarted, and another pod
restarted later; prediction accuracy over simulated time shows the index recovering.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec

from kvcache.sim.fleet import (
    DEFAULT_SCRAPE_INTERVAL,
    FaultAction,
    Fleet,
    FleetSpec,
    build_policy,
    simulate,
)
from kvcache.sim.policies import POLICIES
from kvcache.sim.results import (
    AccuracyPoint,
    Decision,
    RunRecord,
    RunSummary,
    accuracy_timeline,
    recovery_seconds,
    summarize,
)
from kvcache.sim.timing import parse_timing
from kvcache.sim.workloads import WORKLOADS, SimRequest, generate, read_trace

DEFAULT_QPS = (50.0, 100.0, 200.0)
DEFAULT_REQUESTS = 1200
DEMO_POLICY = "precise"
DEFAULT_ROUTER_TIER = 2
TIER_POLICIES = ("least_loaded", "approximate", "precise_load")
"""The router-tier regime compares these (the others keep no router-side state)."""


class SimOptions(msgspec.Struct, frozen=True, kw_only=True):
    """Everything one `kvcache sim` invocation does."""

    out: str = "sim-results"
    qps: tuple[float, ...] = DEFAULT_QPS
    workload: str = "shared-prefix"
    trace: str | None = None
    requests: int = DEFAULT_REQUESTS
    seed: int = 0
    policies: tuple[str, ...] = POLICIES
    faults: tuple[FaultAction, ...] = ()
    fleet: FleetSpec = msgspec.field(default_factory=FleetSpec)
    demo: bool = True
    router_tier: int = DEFAULT_ROUTER_TIER
    """Router replicas of the router-tier regime, run after the sweep at its highest rate
    (`run_router_tier`); below 2 (or a sweep already replicated): not run."""


class Recovery(msgspec.Struct, frozen=True):
    """How long predictions stayed wrong after one restart (None: never recovered)."""

    pod: int
    at: float
    seconds: float | None


class SelfHealing(msgspec.Struct, frozen=True):
    """The self-healing demo: faults injected, accuracy over time, recovery per restart."""

    policy: str
    qps: float
    faults: list[FaultAction]
    window: float
    timeline: list[AccuracyPoint]
    accuracy_before_faults: float
    accuracy_during_loss: float
    recoveries: list[Recovery]
    summary: RunSummary


# -- parsing the command line -------------------------------------------------------------------


def parse_qps(text: str) -> tuple[float, ...]:
    """``"10,20,40"`` -> rates, each > 0."""
    rates: list[float] = []
    for part in text.split(","):
        try:
            rate = float(part)
        except ValueError:
            raise ValueError(f"--qps: {part!r} is not a number") from None
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"--qps: rates must be > 0, got {part!r}")
        rates.append(rate)
    return tuple(sorted(set(rates)))


def parse_faults(text: str) -> tuple[FaultAction, ...]:
    """``"drop=0.05,duplicate=0.01,delay=0.02,restart=30@1"`` -> fault actions.

    Rates and the delay apply to every pod from the start (``KIND=VALUE@POD`` limits one to a
    pod); ``restart=T@POD`` restarts a pod (default pod 0) at simulated second T.
    """
    actions: list[FaultAction] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, sep, value = part.partition("=")
        kind = {"dup": "duplicate", "loss": "drop"}.get(kind, kind)
        if not sep or kind not in ("drop", "duplicate", "delay", "restart"):
            raise ValueError(
                f"--faults: {part!r}: expected drop=P, duplicate=P, delay=S or restart=T[@POD]"
            )
        number, _, pod_text = value.partition("@")
        try:
            amount = float(number)
            pod = int(pod_text) if pod_text else None
        except ValueError:
            raise ValueError(f"--faults: {part!r}: not a number") from None
        if not math.isfinite(amount) or amount < 0:
            raise ValueError(f"--faults: {part!r}: must be >= 0")
        if kind in ("drop", "duplicate") and amount > 1:
            raise ValueError(f"--faults: {part!r}: a probability is at most 1")
        if kind == "restart":
            actions.append(FaultAction(amount, "restart", pod if pod is not None else 0))
        else:
            actions.append(FaultAction(0.0, kind, pod, amount))  # type: ignore[arg-type]
    return tuple(actions)


def options_from_args(args: argparse.Namespace) -> SimOptions:
    """The options of the `kvcache sim` flags (ValueError names the bad flag)."""
    policies = POLICIES
    if args.policies:
        policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
        unknown = [p for p in policies if p not in POLICIES]
        if unknown:
            raise ValueError(f"--policies: unknown {unknown}; one of {', '.join(POLICIES)}")
    if args.workload not in WORKLOADS:
        raise ValueError(f"--workload: one of {', '.join(WORKLOADS)}")
    if (args.workload == "trace") != (args.trace is not None):
        raise ValueError("--trace FILE goes with --workload trace (and only with it)")
    for flag, value in (("--requests", args.requests), ("--pods", args.pods)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.capacity_blocks < 2:
        raise ValueError(f"--capacity-blocks must be >= 2, got {args.capacity_blocks}")
    if args.block_size < 1:
        raise ValueError(f"--block-size must be >= 1, got {args.block_size}")
    scrape = DEFAULT_SCRAPE_INTERVAL if args.scrape_interval is None else args.scrape_interval
    if not (math.isfinite(scrape) and scrape >= 0):
        raise ValueError(f"--scrape-interval must be >= 0 seconds, got {scrape}")
    fleet = FleetSpec(
        pods=args.pods,
        block_size=args.block_size,
        capacity_blocks=args.capacity_blocks,
        timing=parse_timing(args.timing or ()),
        layout=args.layout,
        scrape_interval=scrape,
    )
    faults = parse_faults(args.faults or "")
    bad = [f for f in faults if f.pod is not None and not 0 <= f.pod < args.pods]
    if bad:
        raise ValueError(f"--faults: no pod {bad[0].pod} in a fleet of {args.pods}")
    return SimOptions(
        out=args.out,
        qps=parse_qps(args.qps) if args.qps else DEFAULT_QPS,
        workload=args.workload,
        trace=args.trace,
        requests=args.requests,
        seed=args.seed,
        policies=policies,
        faults=faults,
        fleet=fleet,
        demo=not args.no_demo,
        # The CLI may not offer the flag: the default regime then runs.
        router_tier=getattr(args, "router_tier", DEFAULT_ROUTER_TIER),
    )


# -- running ------------------------------------------------------------------------------------


def workload_at(
    options: SimOptions, qps: float, trace: Sequence[SimRequest] | None
) -> list[SimRequest]:
    """The requests of the configured workload at ``qps``."""
    return generate(options.workload, options.requests, qps, options.seed, trace=trace)


def run_one(
    options: SimOptions,
    policy: str,
    qps: float,
    requests: Sequence[SimRequest],
    *,
    faults: Sequence[FaultAction] = (),
    progress: Callable[[int], None] | None = None,
) -> tuple[RunSummary, RunRecord]:
    """One run on a fresh fleet; returns its summary and raw record."""
    with Fleet(options.fleet, seed=options.seed) as fleet:
        chosen = build_policy(policy, fleet, requests, options.seed)
        record = simulate(
            fleet,
            chosen,
            requests,
            qps=qps,
            workload=options.workload,
            faults=faults,
            progress=progress,
        )
    return summarize(record), record


def run_sweep(
    options: SimOptions,
    trace: Sequence[SimRequest] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[RunSummary]:
    """Every policy at every rate."""
    summaries: list[RunSummary] = []
    for qps in options.qps:
        requests = workload_at(options, qps, trace)
        for policy in options.policies:
            summary, _ = run_one(
                options, policy, qps, requests, faults=options.faults, progress=progress
            )
            summaries.append(summary)
    return summaries


def tier_options(options: SimOptions) -> SimOptions | None:
    """The options of the router-tier regime, or None when it does not run."""
    policies = tuple(p for p in TIER_POLICIES if p in options.policies)
    if options.router_tier < 2 or options.fleet.routers != 1 or not policies:
        return None
    fleet = msgspec.structs.replace(options.fleet, routers=options.router_tier)
    return msgspec.structs.replace(options, fleet=fleet, policies=policies, qps=(max(options.qps),))


def run_router_tier(
    options: SimOptions,
    trace: Sequence[SimRequest] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[RunSummary]:
    """The sweep's highest rate again behind a tier of ``router_tier`` router replicas.

    Each request reaches one replica at random (the same replica for the same request in every
    policy). The approximate router's replicas each keep their own history, as GIE's EPP
    replicas do; precise_load's share the index the engines' events feed. Nothing else changes:
    same requests, fleet, timing and load signals as the sweep's row at that rate.
    """
    tier = tier_options(options)
    return run_sweep(tier, trace, progress) if tier is not None else []


def demo_faults(duration: float) -> list[FaultAction]:
    """Loss on pod 0 over the second quarter, pod 0 restarted at half time, pod 1 at 3/4."""
    return [
        FaultAction(0.25 * duration, "drop", 0, 0.3),
        FaultAction(0.5 * duration, "drop", 0, 0.0),
        FaultAction(0.5 * duration, "restart", 0),
        FaultAction(0.75 * duration, "restart", 1),
    ]


def run_self_healing(
    options: SimOptions,
    trace: Sequence[SimRequest] | None = None,
    progress: Callable[[int], None] | None = None,
) -> SelfHealing:
    """The demo on the middle rate of the sweep (pods 0 and 1; one pod: pod 0 only)."""
    qps = sorted(options.qps)[len(options.qps) // 2]
    requests = workload_at(options, qps, trace)
    duration = requests[-1].arrival if requests else 0.0
    faults = demo_faults(duration)
    if options.fleet.pods < 2:
        faults = [f for f in faults if f.pod == 0]
    summary, record = run_one(options, DEMO_POLICY, qps, requests, faults=faults, progress=progress)
    decisions = record.decisions
    loss_start, loss_end = faults[0].at, faults[1].at
    before = [d for d in decisions if d.t < loss_start]
    during = [d for d in decisions if loss_start <= d.t < loss_end]
    restarts = [f for f in faults if f.kind == "restart"]
    recoveries = []
    for n, fault in enumerate(restarts):
        until = restarts[n + 1].at if n + 1 < len(restarts) else math.inf
        upto = [d for d in decisions if d.t < until]
        recoveries.append(Recovery(fault.pod or 0, fault.at, recovery_seconds(upto, fault.at)))
    window = max(0.25, round(duration / 40, 2))
    return SelfHealing(
        policy=DEMO_POLICY,
        qps=qps,
        faults=faults,
        window=window,
        timeline=accuracy_timeline(decisions, window),
        accuracy_before_faults=_accuracy(before),
        accuracy_during_loss=_accuracy(during),
        recoveries=recoveries,
        summary=summary,
    )


def _accuracy(decisions: Sequence[Decision]) -> float:
    if not decisions:
        return math.nan
    return sum(d.exact for d in decisions) / len(decisions)


def sim_command(args: argparse.Namespace) -> None:
    """`kvcache sim`: the sweep, the demo, the table, the plots, results.json and .csv."""
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
    except ImportError:
        raise ValueError("kvcache sim needs the sim extra: pip install 'kvcache[sim]'") from None
    from kvcache.sim import report

    report.check_plotting()
    options = options_from_args(args)
    trace = read_trace(options.trace, options.seed, options.requests) if options.trace else None
    # Gaps and restarts are the demo's point; their warnings would drown the progress bar.
    logging.getLogger("kvcache.events").setLevel(logging.ERROR)
    logging.getLogger("kvcache.sim").setLevel(logging.ERROR)
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    console = Console()
    if not console.is_terminal:  # a pipe or a file: do not squeeze the table into 80 columns
        console = Console(width=max(console.width, 120))
    tier = tier_options(options)
    runs = len(options.qps) * len(options.policies) + (1 if options.demo else 0)
    runs += len(tier.policies) if tier is not None else 0
    started = time.perf_counter()
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task("simulating requests", total=runs * options.requests)

        def advance(count: int) -> None:
            bar.advance(task, count)

        summaries = run_sweep(options, trace, advance)
        tiered = run_router_tier(options, trace, advance)
        healing = run_self_healing(options, trace, advance) if options.demo else None
    elapsed = time.perf_counter() - started
    targets = report.evaluate_targets(
        summaries,
        healing,
        faults=bool(options.faults),
        tier=tiered,
        tier_routers=options.router_tier,
    )
    report.print_report(console, options, summaries, healing, targets, elapsed, tiered)
    report.write_outputs(out, options, summaries, healing, targets, elapsed, tiered)
    console.print(f"wrote {out}/results.json, results.csv and the plots ({elapsed:.0f} s)")
