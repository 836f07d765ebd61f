"""`make bench`: run every section, write bench/results/latest.json and print a table.

python -m bench.run            # full run (several minutes on 2 cores)
python -m bench.run --quick    # small sizes, to check the harness itself
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import (
    hashing_bench,
    ingest_bench,
    load_bench,
    redis_bench,
    scoring_bench,
    tokenization_bench,
)

RESULTS = Path(__file__).resolve().parent / "results"


def _probe(*args: str) -> dict[str, Any]:
    """Run bench.memory_probe in a fresh interpreter so earlier sections do not skew RSS."""
    output = subprocess.run(
        [sys.executable, "-m", "bench.memory_probe", *args],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
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
    hashing = results["hashing"]
    scoring = results["scoring"]
    mem = results["memory"]
    rows = [("measure", "value", "vs")]
    floor = hashing["floor_hashlib_sha256_ms"]
    rows.append(("hash 8k tokens: hashlib.sha256 floor", f"{floor:.3f} ms", "1.00x"))
    for name, figure in hashing["schemes"].items():
        rows.append(
            (f"hash 8k tokens: {name}", f"{figure['ms']:.3f} ms", f"{figure['x_floor']:.2f}x floor")
        )
    rows.append(
        (
            "score_tokens 8k (sha256_cbor) p50",
            f"{scoring['score_tokens_p50_ms']:.3f} ms",
            "target <= 1 ms",
        )
    )
    rows.append(
        ("score_tokens 8k (sha256_cbor) p99", f"{scoring['score_tokens_p99_ms']:.3f} ms", "")
    )
    rows.append(("lookup+score 512 blocks p50", f"{scoring['lookup_and_score_p50_us']:.1f} us", ""))
    dynamo = scoring.get("dynamo", {})
    if "lookup_p50_us" in dynamo:
        rows.append(
            (
                "Dynamo RadixTree find_matches 512 p50",
                f"{dynamo['lookup_p50_us']:.1f} us",
                f"kvcache lookup+score takes {1 / scoring['lookup_speedup_vs_dynamo']:.2f}x this",
            )
        )
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
    tok = results.get("tokenization")
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
    rows.extend(_ingest_rows(results.get("ingest")))
    rows.extend(_load_rows(results.get("load")))
    rows.extend(_redis_rows(results.get("redis")))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [
        "| " + " | ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) + " |"
        for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


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


def main() -> None:
    """Run all sections and report."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small sizes (harness check)")
    args = parser.parse_args()
    started = time.time()
    results: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
            "cpus": __import__("os").cpu_count(),
        },
        "hashing": hashing_bench.run(repeats=20 if args.quick else 200),
        "scoring": scoring_bench.run(
            repeats=50 if args.quick else 500,
            filler_blocks=50_000 if args.quick else scoring_bench.FILLER_BLOCKS,
        ),
        "memory": memory(args.quick),
        "tokenization": tokenization_bench.run(quick=args.quick),
        "ingest": ingest_bench.run(quick=args.quick),
        "load": load_bench.run(quick=args.quick),
        "redis": redis_bench.run(None, cluster=not args.quick, quick=args.quick),
    }
    results["seconds"] = time.time() - started
    RESULTS.mkdir(exist_ok=True)
    name = "quick.json" if args.quick else "latest.json"
    (RESULTS / name).write_text(json.dumps(results, indent=2) + "\n")
    print(_table(results))
    print(f"\nwritten to bench/results/{name} in {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
