"""`make bench`: run every section, write bench/results/latest.json, print a table and render
the scorecard (bench/results/scorecard.md, `bench.scorecard`).

python -m bench.run                        # full run (several minutes on 2 cores)
python -m bench.run --quick                # small sizes, to check the harness (quick.json)
python -m bench.run --only hashing,redis   # re-run these sections, keep the others' results
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import (
    hashing_bench,
    ingest_bench,
    load_bench,
    redis_bench,
    scorecard,
    scoring_bench,
    tokenization_bench,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# A smaller sweep than `kvcache sim`'s defaults, for --quick only.
SIM_QUICK_ARGS = ("--requests", "160", "--qps", "20,60")


def _probe(*args: str) -> dict[str, Any]:
    """Run bench.memory_probe in a fresh interpreter so earlier sections do not skew RSS."""
    output = subprocess.run(
        [sys.executable, "-m", "bench.memory_probe", *args],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout
    result: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    return result


def memory(quick: bool) -> dict[str, Any]:
    """Bytes per (block, pod) pair: kvcache at >= 10M pairs, and Dynamo's tree per block."""
    big = 200_000 if quick else 10_000_000
    same = 100_000 if quick else 2_000_000
    result: dict[str, Any] = {
        "kvcache_memory_1pod": _probe("kvcache", "--blocks", str(big)),
        "kvcache_memory_4pods": _probe(
            "kvcache", "--blocks", str(big // 4), "--pods-per-block", "4"
        ),
        "kvcache_cost_aware_1pod": _probe("kvcache-cost-aware", "--blocks", str(big)),
        "kvcache_memory_same_size_as_dynamo": _probe("kvcache", "--blocks", str(same)),
    }
    try:
        result["dynamo_radix_tree"] = _probe("dynamo", "--blocks", str(same))
    except subprocess.CalledProcessError as exc:
        result["dynamo_radix_tree"] = {"error": exc.stderr.strip().splitlines()[-1:]}
    else:
        result["dynamo_bytes_per_block_over_kvcache"] = (
            result["dynamo_radix_tree"]["bytes_per_pair"]
            / result["kvcache_memory_same_size_as_dynamo"]["bytes_per_pair"]
        )
    return result


def _table(results: dict[str, Any]) -> str:
    """The terminal summary; sections missing from ``results`` are left out."""
    rows = [("measure", "value", "vs")]
    for area in scorecard.AREAS:
        if results.get(area.key):
            rows.extend(area.rows(results[area.key]))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [
        "| " + " | ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) + " |"
        for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def sim(quick: bool) -> dict[str, Any]:
    """`kvcache sim` with its defaults in a fresh interpreter; its outputs folded in.

    The plots stay in the output directory (``out``, relative to the repository), where the
    scorecard copies them from.
    """
    out = RESULTS / ("sim-quick" if quick else "sim")
    command = [sys.executable, "-m", "kvcache.service.cli", "sim", "--out", str(out)]
    subprocess.run([*command, *(SIM_QUICK_ARGS if quick else ())], check=True, cwd=ROOT)

    def read(name: str) -> Any:
        return json.loads((out / name).read_text())

    run = read("run.json")
    healing = None
    if (out / "self_healing.json").exists():  # the timeline is in the plot; the summary, in runs
        demo = read("self_healing.json")
        healing = {k: v for k, v in demo.items() if k not in ("timeline", "summary")}
    options = {k: v for k, v in run["options"].items() if k != "out"}
    return {
        "out": str(out.relative_to(ROOT)),
        "options": options,
        "wall_seconds": run["wall_seconds"],
        "runs": read("results.json"),
        # The router-tier regime (kvcache.sim.run.run_router_tier), when it ran.
        "router_tier": read("router_tier.json") if (out / "router_tier.json").exists() else [],
        "targets": read("targets.json"),
        "self_healing": healing,
    }


def _cpu_model() -> str | None:
    """The first ``model name`` of /proc/cpuinfo (None where there is none, e.g. not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return None


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def machine() -> dict[str, Any]:
    """What the figures were measured on; the load average says how shared the machine was."""
    return {
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "date": _now(),
        "loadavg_at_start": _loadavg(),
    }


SECTIONS: dict[str, Callable[[bool], dict[str, Any]]] = {
    "hashing": lambda quick: hashing_bench.run(repeats=20 if quick else 200),
    "scoring": lambda quick: scoring_bench.run(
        repeats=50 if quick else 500,
        filler_blocks=50_000 if quick else scoring_bench.FILLER_BLOCKS,
    ),
    "memory": memory,
    "tokenization": lambda quick: tokenization_bench.run(quick=quick),
    "ingest": lambda quick: ingest_bench.run(quick=quick),
    "load": lambda quick: load_bench.run(quick=quick),
    "redis": lambda quick: redis_bench.run(None, cluster=not quick, quick=quick),
    "sim": sim,
}


def parse_only(text: str) -> list[str]:
    """``"hashing,redis"`` -> section names in run order (ValueError names unknown ones)."""
    names = {part.strip() for part in text.split(",") if part.strip()}
    unknown = sorted(names - SECTIONS.keys())
    if unknown or not names:
        raise ValueError(f"--only: unknown {unknown}; sections are {', '.join(SECTIONS)}")
    return [name for name in SECTIONS if name in names]


def run_sections(
    names: list[str], quick: bool, previous: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run ``names`` and merge them over ``previous`` (whose other sections are kept).

    ``section_runs`` records, per section, when it ran, for how long, the load average at its
    start and whether it was a quick run: after ``--only`` the sections of one file come from
    different runs, and the scorecard says so.
    """
    results: dict[str, Any] = dict(previous or {})
    runs: dict[str, Any] = dict(results.get("section_runs", {}))
    results["machine"] = machine()
    started = time.time()
    for name in names:
        at, load, clock = _now(), _loadavg(), time.perf_counter()
        results[name] = SECTIONS[name](quick)
        runs[name] = {
            "started": at,
            "seconds": round(time.perf_counter() - clock, 1),
            "loadavg_at_start": load,
            "quick": quick,
        }
    results["section_runs"] = {k: runs[k] for k in SECTIONS if k in runs}
    results["seconds"] = time.time() - started
    return results


def main() -> None:
    """Run the sections, write the JSON, print the table, render the scorecard."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small sizes (harness check)")
    parser.add_argument(
        "--only",
        default=None,
        metavar="SECTION[,SECTION]",
        help=f"re-run these sections and merge them into the existing file ({', '.join(SECTIONS)})",
    )
    args = parser.parse_args()
    try:
        names = parse_only(args.only) if args.only else list(SECTIONS)
    except ValueError as exc:
        parser.error(str(exc))
    name = "quick.json" if args.quick else "latest.json"
    path = RESULTS / name
    previous = json.loads(path.read_text()) if args.only and path.exists() else None
    results = run_sections(names, args.quick, previous)
    RESULTS.mkdir(exist_ok=True)
    scratch = path.with_suffix(".json.tmp")  # never a half-written latest.json
    scratch.write_text(json.dumps(results, indent=2) + "\n")
    scratch.replace(path)
    print(_table(results))
    card = scorecard.render(
        results, RESULTS / ("quick-scorecard.md" if args.quick else "scorecard.md")
    )
    print(f"\nwritten to bench/results/{name} in {results['seconds']:.0f} s; scorecard: {card}")


if __name__ == "__main__":
    main()
