"""The benchmark scorecard: bench/results/scorecard.md and its PNGs, from latest.json.

One section per area (hashing, scoring, memory, tokenization, ingest, Redis/Valkey, HTTP load,
simulator): what is measured and against what, the figures with their ratios to the floor or
peer measured in the same run, each target met or not, and plots. Every figure comes from the
JSON; an area missing from it is shown as "not run". `bench.run` renders it at the end of a run.

    python -m bench.scorecard [--input bench/results/latest.json] [--out bench/results/scorecard.md]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
Rows = list[tuple[str, str, str]]


class Check(msgspec.Struct, frozen=True):
    """One target, measured: ``met`` is None when the run lacks the figure."""

    area: str
    name: str
    measured: str
    threshold: str
    met: bool | None


def _at(data: Any, *path: str) -> Any:
    """``data[path[0]][path[1]]...``, or None where any step is missing."""
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _number(value: Any) -> float | None:
    """A finite number, or None (JSON null, a missing key, NaN, a string)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def compare(value: Any, op: str, limit: float) -> bool | None:
    """Whether ``value op limit`` holds (None: no finite value to compare)."""
    number = _number(value)
    if number is None:
        return None
    if op == "<=":
        return number <= limit
    if op == "<":
        return number < limit
    if op == ">=":
        return number >= limit
    if op == "==":
        return number == limit
    raise ValueError(f"unknown comparison {op!r}")


def _check(
    area: str, name: str, value: Any, threshold: tuple[str, float], fmt: Callable[[float], str]
) -> Check:
    """``value`` against ``threshold`` (an operator and a limit), both shown with ``fmt``."""
    op, limit = threshold
    number = _number(value)
    return Check(
        area,
        name,
        "n/a" if number is None else fmt(number),
        f"{op} {fmt(limit)}",
        compare(value, op, limit),
    )


def _x(value: float) -> str:
    return f"{value:.2f}x"


# -- rows (bench.run's table and the scorecard's) ---------------------------------------------


def _hashing_rows(hashing: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    if not hashing:
        return []
    floor = hashing["floor_hashlib_sha256_ms"]
    rows = [("hash 8k tokens: hashlib.sha256 floor", f"{floor:.3f} ms", "1.00x")]
    for name, figure in hashing["schemes"].items():
        rows.append(
            (f"hash 8k tokens: {name}", f"{figure['ms']:.3f} ms", f"{figure['x_floor']:.2f}x floor")
        )
    return rows


def _scoring_rows(scoring: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    if not scoring:
        return []
    rows = [
        (
            "score_tokens 8k (sha256_cbor) p50",
            f"{scoring['score_tokens_p50_ms']:.3f} ms",
            "target <= 1 ms",
        ),
        ("score_tokens 8k (sha256_cbor) p99", f"{scoring['score_tokens_p99_ms']:.3f} ms", ""),
        ("lookup+score 512 blocks p50", f"{scoring['lookup_and_score_p50_us']:.1f} us", ""),
    ]
    dynamo = scoring.get("dynamo", {})
    if "lookup_p50_us" in dynamo:
        rows.append(
            (
                "Dynamo RadixTree find_matches 512 p50",
                f"{dynamo['lookup_p50_us']:.1f} us",
                f"kvcache lookup+score takes {1 / scoring['lookup_speedup_vs_dynamo']:.2f}x this",
            )
        )
    return rows


def _memory_rows(mem: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    if not mem:
        return []
    rows = []
    for label, key in (
        ("memory index, 1 pod/block", "kvcache_memory_1pod"),
        ("memory index, 4 pods/block", "kvcache_memory_4pods"),
        ("cost-aware index, 1 pod/block", "kvcache_cost_aware_1pod"),
    ):
        probe = mem[key]
        rows.append(
            (
                f"bytes/pair, {label} ({probe['pairs']:,} pairs)",
                f"{probe['bytes_per_pair']:.1f} B",
                "target <= 64 B",
            )
        )
    if "bytes_per_pair" in mem.get("dynamo_radix_tree", {}):
        same = mem["kvcache_memory_same_size_as_dynamo"]
        rows.append(
            (
                f"bytes/block, kvcache ({same['pairs']:,} blocks)",
                f"{same['bytes_per_pair']:.1f} B",
                "",
            )
        )
        rows.append(
            (
                f"bytes/block, Dynamo RadixTree ({mem['dynamo_radix_tree']['pairs']:,} blocks)",
                f"{mem['dynamo_radix_tree']['bytes_per_pair']:.1f} B",
                f"kvcache {mem['dynamo_bytes_per_block_over_kvcache']:.2f}x smaller",
            )
        )
    return rows


def _tokenization_rows(tok: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    if tok:
        for size, figure in tok["tokenizer_overhead"].items():
            rows.append(
                (
                    f"tokenize {size}-token completion",
                    f"{figure['ours_ms']:.3f} ms",
                    f"{figure['overhead_ratio']:.2f}x raw tokenizers",
                )
            )
        chat = tok["growing_chat"]
        rows.append(
            (
                f"{chat['turns']}-turn growing chat, prefix store",
                f"{chat['store_total_ms']:.1f} ms",
                f"{chat['speedup']:.1f}x faster than fresh, identical={chat['identical_tokens']}",
            )
        )
        score_chat = tok["score_chat_8k"]
        rows.append(
            (
                f"score_chat {score_chat['prompt_tokens']}-token chat p50 / p99",
                f"{score_chat['p50_ms']:.2f} / {score_chat['p99_ms']:.2f} ms",
                "",
            )
        )
    return rows


def _ingest_rows(ingest: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    if not ingest:
        return []
    flow = ingest["ingest"]
    rates = flow["blocks_per_s"]

    def mops(value: float) -> str:
        return f"{value / 1e6:.3f} M blocks/s"

    def vs(ratio: float | None, suffix: str = "") -> str:
        return "" if ratio is None else f"{ratio:.2f}x Dynamo{suffix}"

    rows = [
        (
            "ingest: publisher send rate (own process)",
            mops(flow["publisher_send_blocks_per_s"]),
            "",
        ),
        ("ingest: bare SUB floor (count only)", mops(rates["bare_sub"]), ""),
    ]
    if "dynamo" in rates:
        rows.append(("ingest: Dynamo indexer --threads 1", mops(rates["dynamo"]), "1.00x"))
    if "dynamo_2_threads" in rates:
        rows.append(
            (
                "ingest: Dynamo indexer --threads 2",
                mops(rates["dynamo_2_threads"]),
                f"kvcache identity {flow['identity_vs_dynamo_2_threads']:.2f}x this",
            )
        )
    rows += [
        (
            "ingest: kvcache identity, 1 shard (service default)",
            mops(rates["kvcache_identity"]),
            vs(flow["identity_vs_dynamo"], " (target >= 1.5x)"),
        ),
        (
            "ingest: kvcache identity, 2 shards",
            mops(rates["kvcache_identity_2_shards"]),
            vs(flow["identity_2_shards_vs_dynamo"]),
        ),
        *(
            [
                (
                    "ingest: kvcache identity, on an event loop (as `kvcache serve`)",
                    mops(rates["kvcache_identity_on_loop"]),
                    vs(flow["identity_on_loop_vs_dynamo"])
                    + f"; {flow['identity_on_loop_vs_thread']:.2f}x the receive thread",
                )
            ]
            if "kvcache_identity_on_loop" in rates
            else []
        ),
        (
            "ingest: kvcache dual-key (seed mismatch)",
            mops(rates["kvcache_dual"]),
            vs(flow["dual_vs_dynamo"]),
        ),
    ]
    load = ingest["scoring_under_load"]["service"]
    rows.append(
        (
            "score_tokens 8k p99 during full-rate ingest",
            f"{load['load_p99_ms']:.2f} ms",
            f"{load['p99_load_over_idle']:.1f}x idle p99 ({load['idle_p99_ms']:.2f} ms)",
        )
    )
    return rows


def _load_rows(load: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    if not load:
        return []
    cond = load["conditions"]
    rate = load["workload"]["paced_blocks_per_s"] / 1e3

    def ms(name: str) -> str:
        return f"{cond[name]['p50_ms']:.2f} / {cond[name]['p99_ms']:.2f} ms"

    def x(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}x"

    sent = sum(c["requests"] for name, c in cond.items() if not name.startswith("in_process"))
    errors = f"{load['errors']} errors / {sent:,} HTTP requests"
    rows = [
        (
            f"HTTP /score_tokens 8k p50 / p99, {rate:.0f}k blocks/s ingest",
            ms("kvcache_c1"),
            f"{x(load['http_p50_over_in_process'])} in-process p50 "
            f"({cond['in_process']['p50_ms']:.2f} ms; target <= 2x)",
        ),
        (
            "HTTP overhead per score (HTTP p50 - in-process p50), ingest",
            "n/a" if load.get("http_overhead_ms") is None else f"{load['http_overhead_ms']:.2f} ms",
            f"{x(load.get('http_overhead_over_in_process'))} in-process p50 (target <= 2x)",
        ),
        *(
            [
                (
                    "Transport floor: the same requests to a null server, p50 / p99, ingest",
                    ms("floor_c1"),
                    "kvcache's p50 - this = "
                    + (
                        "n/a"
                        if load.get("http_over_floor_ms") is None
                        else f"{load['http_over_floor_ms']:.2f} ms"
                    )
                    + f" = {x(load.get('http_over_floor_over_in_process'))} in-process p50 "
                    f"({x(load.get('idle_http_over_floor_over_in_process'))} with no ingest)",
                )
            ]
            if "floor_c1" in cond
            else []
        ),
        *(
            [
                (
                    "kvcache's own time per score (request read -> response ready), ingest",
                    f"{load['server_mean_ms']:.2f} ms mean",
                    f"{x(load.get('server_mean_over_in_process'))} in-process mean "
                    f"({x(load.get('idle_server_mean_over_in_process'))} with no ingest)",
                )
            ]
            if load.get("server_mean_ms") is not None
            else []
        ),
        (
            "HTTP /score_tokens 8k p50 / p99, no ingest",
            ms("kvcache_c1_idle"),
            f"{x(load['idle_http_p50_over_in_process'])} in-process p50 "
            f"({cond['in_process_idle']['p50_ms']:.2f} ms)",
        ),
        (
            "HTTP /score_tokens 8k throughput, 4 connections, ingest",
            f"{cond['kvcache_c4']['throughput_rps']:.0f} req/s",
            errors,
        ),
    ]
    if "dynamo_c1" in cond:
        rows += [
            (
                "Dynamo /query 8k p50 / p99, same ingest",
                ms("dynamo_c1"),
                f"kvcache HTTP p50 takes {x(load['kvcache_p50_over_dynamo'])} this",
            ),
            (
                "Dynamo /query 8k throughput, 4 connections",
                f"{cond['dynamo_c4']['throughput_rps']:.0f} req/s",
                f"kvcache {x(load['kvcache_throughput_over_dynamo'])} this",
            ),
        ]
    if "kvcache_c1_wrk" in cond:  # the same c1 windows from wrk (a C client)
        rows.append(
            (
                "wrk: HTTP /score_tokens 8k p50 / p99, same ingest",
                ms("kvcache_c1_wrk"),
                f"{x(load.get('wrk_http_p50_over_in_process'))} in-process p50",
            )
        )
    if "dynamo_c1_wrk" in cond:
        rows.append(
            (
                "wrk: Dynamo /query 8k p50 / p99, same ingest",
                ms("dynamo_c1_wrk"),
                f"kvcache p50 takes {x(load.get('wrk_kvcache_p50_over_dynamo'))} this",
            )
        )
    if "dynamo_c1_pinned" in cond:  # idle, client and servers on one core
        rows += [
            ("HTTP /score_tokens 8k p50 / p99, idle, one core", ms("kvcache_c1_pinned"), ""),
            (
                "Dynamo /query 8k p50 / p99, idle, one core",
                ms("dynamo_c1_pinned"),
                f"kvcache p50 takes {x(load.get('pinned_kvcache_p50_over_dynamo'))} this",
            ),
        ]
    return rows


def _redis_rows(redis: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    if not redis:
        return []
    floor = redis["floor"]["pipelined_512_get_us"]
    lookup = redis["lookup_512_keys_64_pods"]
    ingest = redis["ingest"]
    memory = redis["memory"]
    rows = [
        ("Valkey floor: 512 pipelined GETs, one round trip", f"{floor:.0f} us", "1.00x"),
        (
            "Valkey lookup 512-key prefix, 64 pods (p50)",
            f"{lookup['lookup_runs_median_us']:.0f} us",
            f"{redis['lookup_vs_floor']:.2f}x floor (target <= 2x)",
        ),
        (
            "Valkey ingest, identity, 64 / 512 blocks per add",
            f"{ingest['ingest_batch64_blocks_per_s'] / 1e3:.0f}k / "
            f"{ingest['ingest_batch512_blocks_per_s'] / 1e3:.0f}k blocks/s",
            "target >= 200k",
        ),
        (
            "Valkey server memory per block (1 entry)",
            f"{memory['bytes_per_block_one_entry']:.0f} B",
            f"+{memory['bytes_per_extra_entry']:.0f} B per extra entry",
        ),
    ]
    cluster = redis.get("cluster_lookup_512_keys_64_pods")
    if cluster:
        rows.append(
            (
                "Valkey 3-node cluster lookup 512-key prefix (p50)",
                f"{cluster['lookup_runs_median_us']:.0f} us",
                f"{cluster['lookup_runs_median_us'] / floor:.2f}x standalone floor",
            )
        )
    return rows


def _sim_rows(sim: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    if not sim:
        return []
    marks = {True: "met", False: "NOT met", None: "n/a"}
    rows = []
    for target in sim["targets"]:
        value = "-" if target["value"] is None else f"{target['value']:.4g}"
        rows.append(
            (
                f"sim: {target['name']}",
                value,
                f"{marks[target['met']]} (target {target['threshold']})",
            )
        )
    return rows


# -- targets ------------------------------------------------------------------------------------


def _ms(value: float) -> str:
    return f"{value:.3g} ms"


def _bytes(value: float) -> str:
    return f"{value:.3g} B"


def _kblocks(value: float) -> str:
    return f"{value / 1e3:.0f}k blocks/s"


def _scoring_checks(scoring: dict[str, Any]) -> list[Check]:
    p50 = scoring.get("score_tokens_p50_ms")
    return [_check("scoring", "score_tokens 8k p50", p50, ("<=", 1.0), _ms)]


MEMORY_TARGET_PAIRS = 10_000_000
MEMORY_PROBES = (
    ("memory index, 1 pod/block", "kvcache_memory_1pod"),
    ("memory index, 4 pods/block", "kvcache_memory_4pods"),
    ("cost-aware index, 1 pod/block", "kvcache_cost_aware_1pod"),
)


def _memory_checks(mem: dict[str, Any]) -> list[Check]:
    """<= 64 B per pair, a target at >= 10M pairs: smaller (quick) probes are shown, not judged."""
    checks = []
    for label, key in MEMORY_PROBES:
        pairs = _number(_at(mem, key, "pairs"))
        size = "" if pairs is None else f" ({pairs:,.0f} pairs)"
        value = _at(mem, key, "bytes_per_pair")
        check = _check("memory", f"bytes per pair, {label}{size}", value, ("<=", 64), _bytes)
        judged = pairs is not None and pairs >= MEMORY_TARGET_PAIRS
        checks.append(
            msgspec.structs.replace(
                check,
                threshold=f"{check.threshold} at >= {MEMORY_TARGET_PAIRS / 1e6:.0f}M pairs",
                met=check.met if judged else None,
            )
        )
    return checks


def _tokenization_checks(tok: dict[str, Any]) -> list[Check]:
    identical = _at(tok, "growing_chat", "identical_tokens")
    return [
        Check(
            "tokenization",
            "prefix store: same tokens as fresh tokenization",
            "n/a" if identical is None else str(identical).lower(),
            "identical",
            identical if isinstance(identical, bool) else None,
        )
    ]


def _ingest_checks(ingest: dict[str, Any]) -> list[Check]:
    ratio = _at(ingest, "ingest", "identity_vs_dynamo")
    name = "kvcache identity ingest / Dynamo indexer (blocks/s)"
    return [_check("ingest", name, ratio, (">=", 1.5), _x)]


def _redis_checks(redis: dict[str, Any]) -> list[Check]:
    lookup = "lookup 512-key prefix, 64 pods / 512 pipelined GETs"
    return [
        _check("redis", lookup, redis.get("lookup_vs_floor"), ("<=", 2.0), _x),
        *(
            _check(
                "redis",
                f"ingest, identity, {n} blocks per add",
                _at(redis, "ingest", f"ingest_batch{n}_blocks_per_s"),
                (">=", 200_000),
                _kblocks,
            )
            for n in (64, 512)
        ),
    ]


def _load_checks(load: dict[str, Any]) -> list[Check]:
    def ratio(name: str, key: str, threshold: tuple[str, float]) -> list[Check]:
        """The check, or none when this run did not measure it (no wrk, no Dynamo, ...)."""
        value = load.get(key)
        return [] if value is None else [_check("load", name, value, threshold, _x)]

    ratio_name = "HTTP /score_tokens p50 / in-process p50, during ingest"
    return [
        _check("load", ratio_name, load.get("http_p50_over_in_process"), ("<=", 2.0), _x),
        _check(
            "load",
            "HTTP overhead (HTTP p50 - in-process p50) / in-process p50, during ingest",
            load.get("http_overhead_over_in_process"),
            ("<=", 2.0),
            _x,
        ),
        *ratio(
            "kvcache's own time per score (its /metrics: request read -> response ready)"
            " / in-process, means, during ingest: the server's overhead <= 2x",
            "server_mean_over_in_process",
            ("<=", 3.0),
        ),
        _check(
            "load",
            "kvcache HTTP p50 / Dynamo /query p50, during ingest",
            load.get("kvcache_p50_over_dynamo"),
            ("<", 1.0),
            _x,
        ),
        *ratio("the same, both driven by wrk", "wrk_kvcache_p50_over_dynamo", ("<", 1.0)),
        *ratio(
            "the same, idle, client and servers pinned to one core",
            "pinned_kvcache_p50_over_dynamo",
            ("<", 1.0),
        ),
        _check("load", "HTTP errors", load.get("errors"), ("==", 0), lambda v: f"{v:.0f}"),
    ]


def _sim_checks(sim: dict[str, Any]) -> list[Check]:
    checks = []
    for target in sim.get("targets", []):
        value = _number(target.get("value"))
        met = target.get("met")
        checks.append(
            Check(
                "sim",
                str(target.get("name")),
                "n/a" if value is None else f"{value:.4g}",
                str(target.get("threshold")),
                met if isinstance(met, bool) else None,
            )
        )
    return checks


# -- plots --------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    return plt


def _bars(
    path: Path,
    title: str,
    ylabel: str,
    labels: Sequence[str],
    series: Mapping[str, Sequence[Any]],
    *,
    line: tuple[float, str] | None = None,
    log: bool = False,
) -> bool:
    """Grouped bars, one group per label; a missing value leaves its bar out."""
    plt = _pyplot()
    width = 0.8 / max(1, len(series))
    figure, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) + 2), 4.2))
    for n, (name, values) in enumerate(series.items()):
        heights = [math.nan if _number(v) is None else v for v in values]
        xs = [i + (n - (len(series) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, heights, width, label=name)
    if line is not None:
        ax.axhline(line[0], color="red", linestyle="--", linewidth=1, label=line[1])
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    if len(series) > 1 or line is not None:
        ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def _hashing_plots(hashing: dict[str, Any], images: Path) -> list[str]:
    schemes = hashing["schemes"]
    labels = ["hashlib.sha256 floor", *schemes]
    values = [hashing["floor_hashlib_sha256_ms"], *(s["ms"] for s in schemes.values())]
    title = f"hash a {hashing.get('prompt_tokens', '?')}-token prompt into block keys"
    _bars(images / "hashing.png", title, "ms (median)", labels, {"ms": values}, log=True)
    return ["hashing.png"]


def _scoring_plots(scoring: dict[str, Any], results: dict[str, Any], images: Path) -> list[str]:
    def ms(value: Any, scale: float = 1.0) -> float | None:
        number = _number(value)
        return None if number is None else number * scale

    labels = ["score_tokens 8k", "lookup+score 512", "Dynamo find_matches 512"]
    p50 = [
        ms(scoring.get("score_tokens_p50_ms")),
        ms(scoring.get("lookup_and_score_p50_us"), 1e-3),
        ms(_at(scoring, "dynamo", "lookup_p50_us"), 1e-3),
    ]
    p99 = [
        ms(scoring.get("score_tokens_p99_ms")),
        ms(scoring.get("lookup_and_score_p99_us"), 1e-3),
        ms(_at(scoring, "dynamo", "lookup_p99_us"), 1e-3),
    ]
    # The same call measured by the ingest and tokenization sections, when they ran.
    loaded = _at(results, "ingest", "scoring_under_load", "service")
    if isinstance(loaded, dict):
        labels.append("score_tokens 8k during ingest")
        p50.append(ms(loaded.get("load_p50_ms")))
        p99.append(ms(loaded.get("load_p99_ms")))
    chat = _at(results, "tokenization", "score_chat_8k")
    if isinstance(chat, dict):
        labels.append("score_chat 8k")
        p50.append(ms(chat.get("p50_ms")))
        p99.append(ms(chat.get("p99_ms")))
    _bars(
        images / "scoring.png",
        "score latency",
        "ms",
        labels,
        {"p50": p50, "p99": p99},
        line=(1.0, "target: score_tokens p50 <= 1 ms"),
        log=True,
    )
    return ["scoring.png"]


def _memory_plots(mem: dict[str, Any], images: Path) -> list[str]:
    labels = [label for label, _ in MEMORY_PROBES]
    values = [_at(mem, key, "bytes_per_pair") for _, key in MEMORY_PROBES]
    if _number(_at(mem, "dynamo_radix_tree", "bytes_per_pair")) is not None:
        labels += ["kvcache, Dynamo's size", "Dynamo RadixTree"]
        values += [
            _at(mem, "kvcache_memory_same_size_as_dynamo", "bytes_per_pair"),
            _at(mem, "dynamo_radix_tree", "bytes_per_pair"),
        ]
    _bars(
        images / "memory.png",
        "bytes per (block, pod) pair",
        "bytes",
        labels,
        {"bytes": values},
        line=(64.0, "target <= 64 B"),
    )
    return ["memory.png"]


def _tokenization_plots(tok: dict[str, Any], images: Path) -> list[str]:
    sizes = tok["tokenizer_overhead"]
    labels = [f"{size} completion" for size in sizes]
    ours = [figure.get("ours_ms") for figure in sizes.values()]
    raw = [figure.get("raw_ms") for figure in sizes.values()]
    chat = tok.get("growing_chat")
    if isinstance(chat, dict):
        labels.append(f"{chat.get('turns')}-turn chat (total)")
        ours.append(chat.get("store_total_ms"))
        raw.append(chat.get("fresh_total_ms"))
    series = {"kvcache (prefix store on for the chat)": ours, "raw tokenizer / fresh": raw}
    _bars(images / "tokenization.png", "tokenization", "ms", labels, series, log=True)
    return ["tokenization.png"]


INGEST_LABELS = {
    "dynamo": "Dynamo indexer --threads 1",
    "dynamo_2_threads": "Dynamo indexer --threads 2",
    "kvcache_identity": "kvcache identity, 1 shard",
    "kvcache_identity_2_shards": "kvcache identity, 2 shards",
    "kvcache_dual": "kvcache dual-key",
}


def _ingest_plots(ingest: dict[str, Any], images: Path) -> list[str]:
    trials = _at(ingest, "ingest", "trials") or {}
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(8, 4.5))
    for key, label in INGEST_LABELS.items():
        runs = trials.get(key) or []
        rates = [_number(t.get("blocks_per_s")) for t in runs]
        points = [(n + 1, r / 1e6) for n, r in enumerate(rates) if r is not None]
        if points:
            ax.plot(*zip(*points, strict=True), "o-", label=label)
    dynamo = _number(_at(ingest, "ingest", "blocks_per_s", "dynamo"))
    if dynamo is not None:
        ax.axhline(1.5 * dynamo / 1e6, color="red", linestyle="--", label="target: 1.5x Dynamo")
    repeats = max((len(trials.get(key) or []) for key in INGEST_LABELS), default=0)
    ax.set_xticks(range(1, repeats + 1))
    ax.set_xlabel("repeat (conditions interleaved within a repeat)")
    ax.set_ylabel("M blocks/s")
    ax.set_ylim(bottom=0)
    ax.set_title("ingest from the same event stream, per repeat")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(images / "ingest.png", dpi=100)
    plt.close(figure)
    return ["ingest.png"]


def _redis_plots(redis: dict[str, Any], images: Path) -> list[str]:
    floor = _at(redis, "floor", "pipelined_512_get_us")
    lookup = redis.get("lookup_512_keys_64_pods") or {}
    labels = ["floor: 512 pipelined GETs", "lookup", "lookup + score", "lookup, 8 pods"]
    values = [
        floor,
        lookup.get("lookup_runs_median_us"),
        lookup.get("lookup_and_score_median_us"),
        lookup.get("lookup_filtered_8_pods_median_us"),
    ]
    cluster = _at(redis, "cluster_lookup_512_keys_64_pods", "lookup_runs_median_us")
    if cluster is not None:
        labels.append("lookup, 3-node cluster")
        values.append(cluster)
    number = _number(floor)
    line = None if number is None else (2 * number, "target: lookup <= 2x floor")
    title = "Valkey: 512-key prefix held by 64 pods (median)"
    _bars(images / "redis.png", title, "us", labels, {"us": values}, line=line)
    return ["redis.png"]


def _load_plots(load: dict[str, Any], images: Path) -> list[str]:
    conditions = load["conditions"]
    names = [n for n in conditions if _number(conditions[n].get("p50_ms")) is not None]
    series = {
        "p50": [conditions[n]["p50_ms"] for n in names],
        "p99": [conditions[n].get("p99_ms") for n in names],
    }
    _bars(images / "load.png", "8k-token score requests", "ms", names, series, log=True)
    return ["load.png"]


SIM_PLOTS = ("ttft_vs_qps.png", "hit_rate_vs_qps.png", "self_healing.png")


def _sim_plots(sim: dict[str, Any], images: Path) -> list[str]:
    """The simulator's own PNGs, copied from its output directory when it is still there."""
    source = ROOT / str(sim.get("out", ""))
    copied = []
    for name in SIM_PLOTS:
        if (source / name).is_file():
            shutil.copyfile(source / name, images / f"sim_{name}")
            copied.append(f"sim_{name}")
    return copied


# -- the simulator's tables ---------------------------------------------------------------------


def _percent(value: Any) -> str:
    number = _number(value)
    return "n/a" if number is None else f"{number:.1%}"


def _seconds(value: Any) -> str:
    number = _number(value)
    return "n/a" if number is None else f"{number:.3f}"


def _over(value: Any, base: Any) -> str:
    a, b = _number(value), _number(base)
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def _sim_detail(sim: dict[str, Any]) -> list[str]:
    """One table per rate (policies as rows), ratios to precise_load and oracle at that rate."""
    options = sim.get("options") or {}
    fleet = options.get("fleet") or {}
    lines = [
        f"Workload `{options.get('workload', '?')}`, {options.get('requests', '?')} requests per "
        f"run, {fleet.get('pods', '?')} pods x {fleet.get('capacity_blocks', '?')} blocks of "
        f"{fleet.get('block_size', '?')} tokens, seed {options.get('seed', '?')}; "
        f"{_seconds(sim.get('wall_seconds'))} s wall. Times are simulated seconds.",
        "",
    ]
    runs = [r for r in sim.get("runs", []) if isinstance(r, dict)]
    for qps in sorted({r["qps"] for r in runs}):
        lines += _sim_table(f"**{qps:g} QPS**", [r for r in runs if r["qps"] == qps])
    tier = [r for r in sim.get("router_tier") or [] if isinstance(r, dict)]
    if tier:
        routers = options.get("router_tier", "?")
        lines += _sim_table(
            f"**{tier[0]['qps']:g} QPS behind {routers} router replicas** (each request reaches "
            "one at random; approximate keeps one history per replica, as GIE's EPP replicas "
            "do; precise_load's replicas share the index the engines' events feed; same "
            "requests and fleet as the row above; the oracle is not rerun)",
            tier,
        )
    healing = sim.get("self_healing")
    if isinstance(healing, dict):
        recoveries = "; ".join(
            f"pod {r.get('pod')} restarted at {_seconds(r.get('at'))} s: "
            + (
                "never recovered"
                if _number(r.get("seconds")) is None
                else f"back to 100% within {_seconds(r.get('seconds'))} s"
            )
            for r in healing.get("recoveries", [])
        )
        lines += [
            f"Self-healing demo ({healing.get('policy')} at {healing.get('qps')} QPS): "
            f"prediction accuracy {_percent(healing.get('accuracy_before_faults'))} before "
            f"faults, {_percent(healing.get('accuracy_during_loss'))} while pod 0 loses 30% of "
            f"its event batches; {recoveries}.",
            "",
        ]
    return lines


def _sim_table(title: str, rows: list[dict[str, Any]]) -> list[str]:
    """One rate's policies as rows, with ratios to precise_load and the oracle among them."""
    best = next((r for r in rows if r["policy"] == "precise_load"), {})
    oracle = next((r for r in rows if r["policy"] == "oracle"), {})
    lines = [
        title,
        "",
        "| policy | hit rate | vs oracle | TTFT p50 s | TTFT p90 s | p90 vs precise_load "
        "| TTFT p99 s | output tok/s | vs precise_load | imbalance | accuracy |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        throughput = _number(r.get("throughput"))
        imbalance = _number(r.get("load_imbalance"))
        lines.append(
            f"| {r['policy']} | {_percent(r.get('hit_rate'))} "
            f"| {_over(r.get('hit_rate'), oracle.get('hit_rate'))} "
            f"| {_seconds(r.get('ttft_p50'))} | {_seconds(r.get('ttft_p90'))} "
            f"| {_over(r.get('ttft_p90'), best.get('ttft_p90'))} "
            f"| {_seconds(r.get('ttft_p99'))} "
            f"| {'n/a' if throughput is None else f'{throughput:,.0f}'} "
            f"| {_over(r.get('throughput'), best.get('throughput'))} "
            f"| {'n/a' if imbalance is None else f'{imbalance:.2f}'} "
            f"| {_percent(r.get('prediction_accuracy'))} |"
        )
    lines.append("")
    return lines


# -- the areas ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Area:
    """One section of the scorecard and of `bench.run`'s table."""

    key: str
    """The section's key in latest.json (`bench.run --only KEY`)."""
    title: str
    measured: str
    against: str
    rows: Callable[[dict[str, Any]], Rows]
    checks: Callable[[dict[str, Any]], list[Check]]
    plots: Callable[[dict[str, Any], dict[str, Any], Path], list[str]]
    """Writes PNGs into the directory (given the whole results too); returns their names."""
    detail: Callable[[dict[str, Any]], list[str]] | None = None
    """Markdown shown instead of the rows table."""


AREAS = (
    Area(
        "hashing",
        "Hashing",
        "turning an 8,192-token prompt into its 512 block keys, per key scheme (median).",
        "`hashlib.sha256` over the same token bytes, the floor no chained scheme can beat.",
        _hashing_rows,
        lambda _: [],
        lambda s, _, images: _hashing_plots(s, images),
    ),
    Area(
        "scoring",
        "Scoring and lookup",
        "`Indexer.score_tokens` on an 8k-token prompt (hash, look up, score) against a "
        "1M-block, 64-pod index; lookup + score of its 512 keys alone.",
        "Dynamo's `RadixTree.find_matches` on the same 512 blocks, in the same process.",
        _scoring_rows,
        _scoring_checks,
        _scoring_plots,
    ),
    Area(
        "memory",
        "Memory per entry",
        "RSS growth per (block, pod) pair of the in-memory indexes at 10M pairs, each probe in "
        "a fresh interpreter.",
        "Dynamo's `RadixTree` holding the same number of blocks as a kvcache index.",
        _memory_rows,
        _memory_checks,
        lambda s, _, images: _memory_plots(s, images),
    ),
    Area(
        "tokenization",
        "Tokenization and prefix store",
        "`TextTokenizer.tokenize_completion` on 1k/8k/32k-token prompts; a 32-turn growing chat "
        "tokenized every turn through the prefix store; `score_chat` end to end.",
        "the raw Rust tokenizer's `encode` (floor) and fresh tokenization every turn.",
        _tokenization_rows,
        _tokenization_checks,
        lambda s, _, images: _tokenization_plots(s, images),
    ),
    Area(
        "ingest",
        "Ingest vs Dynamo's indexer",
        "KV-event blocks/s from a fake vLLM fleet over ZeroMQ until the index has applied "
        "them all; `score_tokens` latency while ingesting at full rate.",
        "`python -m dynamo.indexer` on the same stream, and a bare SUB socket that only counts "
        "(floor); conditions interleaved within each repeat.",
        _ingest_rows,
        _ingest_checks,
        lambda s, _, images: _ingest_plots(s, images),
    ),
    Area(
        "redis",
        "Redis / Valkey backend",
        "lookup of a 512-key prefix held by 64 pods (standalone and 3-node cluster), ingest "
        "blocks/s, server memory per block.",
        "512 pipelined `GET`s in one round trip on the same server (floor).",
        _redis_rows,
        _redis_checks,
        lambda s, _, images: _redis_plots(s, images),
    ),
    Area(
        "load",
        "HTTP load",
        "`POST /score_tokens` with 8k-token bodies over 1 and 4 keep-alive connections while "
        "events stream in at a paced rate.",
        "`Indexer.score_tokens` in-process under the same machine load, and Dynamo's "
        "`POST /query` ingesting the same stream.",
        _load_rows,
        _load_checks,
        lambda s, _, images: _load_plots(s, images),
    ),
    Area(
        "sim",
        "Simulator: routing policies",
        "`kvcache sim` (its defaults in a full run): every routing policy on a simulated vLLM "
        "fleet whose KV events feed a real kvcache, at each QPS; then the self-healing demo.",
        "the `oracle` policy (asks the engines) and `precise_load`, on the same requests in "
        "the same run.",
        _sim_rows,
        _sim_checks,
        lambda s, _, images: _sim_plots(s, images),
        _sim_detail,
    ),
)

READ_ERRORS = (KeyError, TypeError, ValueError, IndexError, AttributeError, ZeroDivisionError)


def checks(results: dict[str, Any]) -> list[Check]:
    """Every target of the areas present in ``results``."""
    found: list[Check] = []
    for area in AREAS:
        section = results.get(area.key)
        if isinstance(section, dict):
            try:
                found.extend(area.checks(section))
            except READ_ERRORS:
                continue  # the section itself says it could not be read
    return found


# -- markdown -----------------------------------------------------------------------------------


MARKS = {True: "met", False: "**NOT met**", None: "n/a"}


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def _load(value: Any) -> str:
    if not isinstance(value, list) or not value:
        return "not recorded"
    return " / ".join(str(v) for v in value)


def _sizes(quick: Any) -> str:
    if isinstance(quick, bool):
        return "quick" if quick else "full"
    return "not recorded"


def _machine(results: dict[str, Any]) -> list[str]:
    machine = results.get("machine") or {}

    def get(key: str) -> str:
        value = machine.get(key)
        return "not recorded" if value is None else str(value)

    total = _number(results.get("seconds"))
    lines = [
        "## Machine",
        "",
        *_table(
            ("", ""),
            [
                ("CPU model", get("cpu_model")),
                ("CPUs", get("cpus")),
                ("processor", get("processor")),
                ("platform", get("platform")),
                ("Python", get("python")),
                ("date of the last run", get("date")),
                (
                    "load average at its start (1 / 5 / 15 min)",
                    _load(machine.get("loadavg_at_start")),
                ),
                (
                    "wall time of the last run",
                    "not recorded" if total is None else f"{total:.0f} s",
                ),
            ],
        ),
    ]
    runs = results.get("section_runs") or {}
    rows = []
    for area in AREAS:
        if area.key not in results:
            continue
        run = runs.get(area.key) or {}
        seconds = _number(run.get("seconds"))
        rows.append(
            (
                area.key,
                run.get("started", "not recorded"),
                "not recorded" if seconds is None else f"{seconds:.0f}",
                _load(run.get("loadavg_at_start")),
                _sizes(run.get("quick")),
            )
        )
    if rows and not runs:
        lines += [
            "Per-section start times: not recorded (a file written before `section_runs`).",
            "",
        ]
    elif rows:
        lines += [
            "Sections can be re-run alone (`python -m bench.run --only SECTION`), so each records "
            "its own start; every ratio below is taken within one section's run.",
            "",
            *_table(
                ("section", "started (UTC)", "seconds", "load average at start", "sizes"), rows
            ),
        ]
    return lines


def _section(area: Area, results: dict[str, Any], images: Path) -> list[str]:
    lines = [f"## {area.title}", ""]
    section = results.get(area.key)
    if not isinstance(section, dict) or not section:
        return [
            *lines,
            f"**not run**: latest.json has no `{area.key}` section "
            f"(`python -m bench.run --only {area.key}`).",
            "",
        ]
    lines += [f"**Measured:** {area.measured}  ", f"**Against:** {area.against}", ""]
    try:
        if area.detail is not None:
            lines += area.detail(section)
        else:
            lines += _table(("measure", "value", "vs (same run)"), area.rows(section))
        found = area.checks(section)
    except READ_ERRORS as exc:
        return [*lines, f"**could not be read**: {type(exc).__name__}: {exc}", ""]
    if found:
        rows = [(c.name, c.measured, c.threshold, MARKS[c.met]) for c in found]
        lines += _table(("target", "measured", "threshold", "met"), rows)
    try:
        plots = area.plots(section, results, images)
    except READ_ERRORS as exc:
        lines += [f"Plot not drawn: {type(exc).__name__}: {exc}", ""]
    else:
        for name in plots:
            lines += [f"![{area.key}: {name}]({images.name}/{name})", ""]
        if area.key == "sim" and not plots:
            lines += [f"Plots not available: `{section.get('out')}` holds none.", ""]
    return lines


def markdown(results: dict[str, Any], images: Path, source: str = "latest.json") -> str:
    """The scorecard (writes the PNGs into ``images``, linked relative to its parent)."""
    found = checks(results)
    missing = [a.key for a in AREAS if not results.get(a.key)]
    met = sum(c.met is True for c in found)
    missed = sum(c.met is False for c in found)
    lines = [
        "# kvcache benchmark scorecard",
        "",
        f"Generated by `python -m bench.scorecard` from `{source}` (`make bench` writes both). "
        "Every figure comes from that file; ratios compare kvcache with a floor or a peer "
        "measured in the same run on the same machine.",
        "",
        *_machine(results),
        "## Targets",
        "",
        f"{met} of {len(found)} targets met, {missed} not met, {len(found) - met - missed} "
        "not judged (n/a)" + (f"; not run: {', '.join(missing)}." if missing else "."),
        "",
        *_table(
            ("area", "target", "measured", "threshold", "met"),
            [(c.area, c.name, c.measured, c.threshold, MARKS[c.met]) for c in found],
        ),
    ]
    for area in AREAS:
        lines += _section(area, results, images)
    return "\n".join(lines).rstrip() + "\n"


def render(results: dict[str, Any], out: Path, source: str = "latest.json") -> Path:
    """Write ``out`` (markdown) and its PNGs into the directory named after it; returns ``out``."""
    images = out.parent / out.stem
    images.mkdir(parents=True, exist_ok=True)
    for stale in images.glob("*.png"):  # a section no longer present keeps no old plot
        stale.unlink()
    out.write_text(markdown(results, images, source), encoding="utf-8")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Re-render the scorecard from an existing results file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", type=Path, default=RESULTS / "latest.json")
    parser.add_argument("--out", type=Path, default=RESULTS / "scorecard.md")
    args = parser.parse_args(argv)
    try:
        results = json.loads(args.input.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"bench.scorecard: cannot read {args.input}: {exc}", file=sys.stderr)
        return 1
    if not isinstance(results, dict):
        print(f"bench.scorecard: {args.input} is not a JSON object", file=sys.stderr)
        return 1
    print(render(results, args.out, args.input.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
