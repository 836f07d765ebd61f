"""What `kvcache sim` shows and writes: the rich table, the targets, JSON, CSV and PNG plots.

Files in the output directory:

* ``results.json``: a list, one object per (policy, qps) run (`RunSummary` fields);
* ``results.csv``: the same rows;
* ``self_healing.json``: the demo's faults, accuracy timeline and recovery per restart;
* ``router_tier.json``: the router-tier regime (same `RunSummary` rows, at the highest rate with
  ``SimOptions.router_tier`` router replicas), when it ran;
* ``targets.json``: each target of issue 7, the measured value and whether it is met;
* ``ttft_vs_qps.png``, ``hit_rate_vs_qps.png``, ``self_healing.png``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from kvcache.sim.policies import POLICIES
from kvcache.sim.results import RunSummary

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from kvcache.sim.run import SelfHealing, SimOptions

CSV_FIELDS = tuple(RunSummary.__struct_fields__)


class Target(msgspec.Struct, frozen=True):
    """One of issue 7's targets, measured."""

    name: str
    value: float | None
    """The measured ratio or accuracy (None: not measurable in this run)."""
    threshold: str
    met: bool | None
    """None when the run did not include what the target compares."""


def check_plotting() -> None:
    """Fail early, with the fix, when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("kvcache sim needs the sim extra: pip install 'kvcache[sim]'") from None


def _row(summaries: Sequence[RunSummary], policy: str, qps: float) -> RunSummary | None:
    return next((s for s in summaries if s.policy == policy and s.qps == qps), None)


def _ratio(numerator: float, denominator: float) -> float:
    if denominator <= 0 or math.isnan(numerator) or math.isnan(denominator):
        return math.nan
    return numerator / denominator


def evaluate_targets(
    summaries: Sequence[RunSummary],
    healing: SelfHealing | None,
    *,
    faults: bool = False,
    tier: Sequence[RunSummary] = (),
    tier_routers: int = 0,
) -> list[Target]:
    """Issue 7's targets on this run (``faults``: the sweep injected faults, so the accuracy
    target does not apply to it). ``tier``: the router-tier regime's rows, whose comparison of
    precise_load with approximate is reported next to (never instead of) the sweep's."""
    targets: list[Target] = []
    rates = sorted({s.qps for s in summaries})
    hits = [
        _ratio(p.hit_rate, o.hit_rate)
        for qps in rates
        if (p := _row(summaries, "precise", qps)) and (o := _row(summaries, "oracle", qps))
    ]
    worst = min(hits) if hits else None
    targets.append(
        Target(
            "precise hit rate / oracle hit rate (worst rate)",
            worst,
            ">= 0.95",
            None if worst is None else worst >= 0.95,
        )
    )
    top = rates[-1] if rates else math.nan
    best = _row(summaries, "precise_load", top)
    for other, factor in (("least_loaded", 10.0), ("approximate", 2.0)):
        row = _row(summaries, other, top)
        value = _ratio(row.ttft_p90, best.ttft_p90) if best and row else None
        targets.append(
            Target(
                f"{other} p90 TTFT / precise_load p90 TTFT at {top:g} QPS",
                value,
                f">= {factor:g}",
                None if value is None or math.isnan(value) else value >= factor,
            )
        )
    approx = _row(summaries, "approximate", top)
    value = _ratio(best.throughput, approx.throughput) if best and approx else None
    targets.append(
        Target(
            f"precise_load throughput / approximate throughput at {top:g} QPS",
            value,
            ">= 1.0",
            None if value is None or math.isnan(value) else value >= 1.0,
        )
    )
    targets.extend(_tier_targets(tier, tier_routers))
    accuracy = None if faults else min((s.prediction_accuracy for s in summaries), default=None)
    targets.append(
        Target(
            "prediction accuracy without faults (worst run)",
            accuracy,
            "== 1.0",
            None if accuracy is None else accuracy == 1.0,
        )
    )
    if healing is not None:
        seconds = [r.seconds for r in healing.recoveries if r.seconds is not None]
        recovered = len(seconds) == len(healing.recoveries)
        slowest = max(seconds, default=0.0) if recovered else None
        targets.append(
            Target(
                "seconds to 100% accuracy after a restart (slowest)",
                math.inf if slowest is None else slowest,
                "<= 1.0",
                slowest is not None and slowest <= 1.0,
            )
        )
    return targets


def _tier_targets(tier: Sequence[RunSummary], routers: int) -> list[Target]:
    """The approximate-vs-precise_load targets again, with a router tier of ``routers``."""
    if not tier:
        return []
    top = max(s.qps for s in tier)
    best, approx = _row(tier, "precise_load", top), _row(tier, "approximate", top)
    ttft = _ratio(approx.ttft_p90, best.ttft_p90) if best and approx else None
    output = _ratio(best.throughput, approx.throughput) if best and approx else None
    where = f"at {top:g} QPS, {routers} router replicas"
    return [
        Target(
            f"approximate p90 TTFT / precise_load p90 TTFT {where}",
            ttft,
            ">= 2",
            None if ttft is None or math.isnan(ttft) else ttft >= 2.0,
        ),
        Target(
            f"precise_load throughput / approximate throughput {where}",
            output,
            ">= 1.0",
            None if output is None or math.isnan(output) else output >= 1.0,
        ),
    ]


# -- the terminal ------------------------------------------------------------------------------


def _seconds(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


def print_report(  # noqa: PLR0917 (one call site)
    console: Console,
    options: SimOptions,
    summaries: Sequence[RunSummary],
    healing: SelfHealing | None,
    targets: Sequence[Target],
    elapsed: float,
    tier: Sequence[RunSummary] = (),
) -> None:
    """One table per rate (policies as rows), the router-tier regime, the demo, the targets."""
    spec = options.fleet
    routers = "" if spec.routers == 1 else f", {spec.routers} router replicas"
    scrape = (
        f"loads scraped every {spec.scrape_interval * 1000:g} ms"
        if spec.scrape_interval > 0
        else "live loads"
    )
    console.print(
        f"[bold]kvcache sim[/]: {options.workload}, {options.requests} requests per run, "
        f"{spec.pods} pods x {spec.capacity_blocks} blocks of {spec.block_size} tokens, "
        f"{scrape}, seed {options.seed}{routers}, {elapsed:.0f} s"
    )
    for qps in sorted({s.qps for s in summaries}):
        console.print(_rate_table(f"{qps:g} QPS", [s for s in summaries if s.qps == qps]))
    if tier:
        top = max(s.qps for s in tier)
        title = (
            f"{top:g} QPS, {options.router_tier} router replicas (each request reaches one; "
            "approximate: one history per replica; precise_load: one shared event-fed index)"
        )
        console.print(_rate_table(title, list(tier)))
    _print_healing(console, healing)
    console.print("[bold]targets[/]")
    for target in targets:
        mark = {True: "[green]met[/]", False: "[red]NOT met[/]", None: "[yellow]n/a[/]"}
        value = "-" if target.value is None else f"{target.value:.4g}"
        console.print(f"  {mark[target.met]:>18}  {target.name}: {value} ({target.threshold})")


def _rate_table(title: str, summaries: Sequence[RunSummary]) -> Table:
    """A rich table of ``summaries``, policies in report order."""
    from rich.table import Table

    order = {name: n for n, name in enumerate(POLICIES)}
    table = Table(title=title, title_justify="left")
    for header in (
        "policy",
        "hit rate",
        "TTFT p50 s",
        "TTFT p90 s",
        "TTFT p99 s",
        "output tok/s",
        "imbalance",
        "accuracy",
    ):
        table.add_column(header, justify="left" if header == "policy" else "right")
    rows = sorted(summaries, key=lambda s: order[s.policy])
    for s in rows:
        table.add_row(
            s.policy,
            f"{s.hit_rate:.1%}",
            _seconds(s.ttft_p50),
            _seconds(s.ttft_p90),
            _seconds(s.ttft_p99),
            f"{s.throughput:,.0f}",
            f"{s.load_imbalance:.2f}",
            f"{s.prediction_accuracy:.2%}",
        )
    return table


def _print_healing(console: Console, healing: SelfHealing | None) -> None:
    if healing is not None:
        lines = [
            f"[bold]self-healing[/] ({healing.policy}, {healing.qps:g} QPS): accuracy "
            f"{healing.accuracy_before_faults:.2%} before faults, "
            f"{healing.accuracy_during_loss:.2%} while pod 0 loses 30% of its event batches"
        ]
        for recovery in healing.recoveries:
            took = (
                "never recovered"
                if recovery.seconds is None
                else f"back to 100% within {recovery.seconds:.2f} s"
            )
            lines.append(f"  restart of pod {recovery.pod} at {recovery.at:.1f} s: {took}")
        console.print("\n".join(lines))


# -- files --------------------------------------------------------------------------------------


def _plain(value: object) -> object:
    """JSON has no NaN / infinity: null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _write_json(path: Path, value: object) -> None:
    data = _plain(msgspec.to_builtins(value))
    path.write_bytes(msgspec.json.format(msgspec.json.encode(data), indent=2) + b"\n")


def write_outputs(  # noqa: PLR0917 (one call site)
    out: Path,
    options: SimOptions,
    summaries: Sequence[RunSummary],
    healing: SelfHealing | None,
    targets: Sequence[Target],
    elapsed: float,
    tier: Sequence[RunSummary] = (),
) -> None:
    """results.json / .csv, router_tier.json, self_healing.json, targets.json, run.json and
    the PNGs."""
    _write_json(out / "results.json", list(summaries))
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_FIELDS)
        for summary in summaries:
            writer.writerow(getattr(summary, name) for name in CSV_FIELDS)
    if tier:
        _write_json(out / "router_tier.json", list(tier))
    _write_json(out / "targets.json", list(targets))
    _write_json(out / "run.json", {"options": options, "wall_seconds": elapsed})
    plot_rates(out, summaries)
    if healing is not None:
        _write_json(out / "self_healing.json", healing)
        plot_self_healing(out / "self_healing.png", healing)


def plot_rates(out: Path, summaries: Sequence[RunSummary]) -> None:
    """TTFT (p50, p90) and hit rate against QPS, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    policies = [p for p in POLICIES if any(s.policy == p for s in summaries)]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    for ax, field, title in ((axes[0], "ttft_p50", "TTFT p50"), (axes[1], "ttft_p90", "TTFT p90")):
        for policy in policies:
            rows = sorted((s for s in summaries if s.policy == policy), key=lambda s: s.qps)
            ax.plot([s.qps for s in rows], [getattr(s, field) for s in rows], "o-", label=policy)
        ax.set_yscale("log")
        ax.set_xlabel("QPS")
        ax.set_ylabel("seconds")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=8)
    figure.savefig(out / "ttft_vs_qps.png", dpi=110)
    plt.close(figure)
    figure, ax = plt.subplots(figsize=(6.5, 4.5), constrained_layout=True)
    for policy in policies:
        rows = sorted((s for s in summaries if s.policy == policy), key=lambda s: s.qps)
        ax.plot([s.qps for s in rows], [s.hit_rate for s in rows], "o-", label=policy)
    ax.set_xlabel("QPS")
    ax.set_ylabel("prompt tokens served from cache")
    ax.set_ylim(0, 1)
    ax.set_title("prefix-cache hit rate")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    figure.savefig(out / "hit_rate_vs_qps.png", dpi=110)
    plt.close(figure)


def plot_self_healing(path: Path, healing: SelfHealing) -> None:
    """Prediction accuracy per window of simulated time, with the faults marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(9, 4), constrained_layout=True)
    points = healing.timeline
    ax.step([p.t for p in points], [p.accuracy for p in points], where="post", label="accuracy")
    drops = [f for f in healing.faults if f.kind == "drop"]
    if len(drops) >= 2:
        ax.axvspan(drops[0].at, drops[1].at, color="orange", alpha=0.2, label="pod 0 loses events")
    for fault in healing.faults:
        if fault.kind == "restart":
            ax.axvline(fault.at, color="red", linestyle="--", alpha=0.7)
            ax.text(fault.at, 0.02, f" restart pod {fault.pod}", color="red", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel(f"simulated seconds (windows of {healing.window:g} s)")
    ax.set_ylabel("predicted == engine cached tokens")
    ax.set_title(f"self-healing: {healing.policy} at {healing.qps:g} QPS")
    ax.legend(loc="lower left", fontsize=8)
    figure.savefig(path, dpi=110)
    plt.close(figure)
