"""bench.scorecard renders latest.json into markdown + PNGs; bench.run merges `--only` runs.

No benchmark runs here: the scorecard is rendered from a hand-written results file (figures
picked so that each target's outcome is known without the code under test) and from the
repository's own bench/results/latest.json.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest

from bench import run, scorecard

ROOT = Path(__file__).resolve().parents[2]
REAL_RESULTS = ROOT / "bench" / "results" / "latest.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TITLES = {
    "hashing": "Hashing",
    "scoring": "Scoring and lookup",
    "memory": "Memory per entry",
    "tokenization": "Tokenization and prefix store",
    "ingest": "Ingest vs Dynamo's indexer",
    "redis": "Redis / Valkey backend",
    "load": "HTTP load",
    "sim": "Simulator: routing policies",
}


def _condition(p50: float, p99: float, rps: float) -> dict[str, Any]:
    return {
        "p50_ms": p50,
        "p99_ms": p99,
        "throughput_rps": rps,
        "requests": 100,
        "errors": 0,
        "first_error": None,
    }


def _sim_run(policy: str, qps: float, hit: float, p90: float, tput: float) -> dict[str, Any]:
    return {
        "policy": policy,
        "qps": qps,
        "workload": "shared-prefix",
        "requests": 40,
        "completed": 40,
        "hit_rate": hit,
        "ttft_p50": p90 / 2,
        "ttft_p90": p90,
        "ttft_p99": p90 * 1.5,
        "ttft_mean": p90 / 2,
        "throughput": tput,
        "load_imbalance": 1.1,
        "prediction_accuracy": 1.0,
    }


def _results(sim_out: Path) -> dict[str, Any]:
    """Every section, with round figures whose targets are decided by hand (see comments)."""
    probe = {"pairs": 10_000_000, "rss_delta_bytes": 0}
    return {
        "machine": {
            "python": "3.11.99",
            "processor": "x86_64",
            "cpu_model": "Test CPU 9000",
            "cpus": 7,
            "platform": "Linux-test",
            "date": "2030-01-02T03:04:05+00:00",
            "loadavg_at_start": [1.25, 0.5, 0.75],
        },
        "section_runs": {
            "hashing": {
                "started": "2030-01-02T03:04:05+00:00",
                "seconds": 3.0,
                "loadavg_at_start": [1.25, 0.5, 0.75],
                "quick": False,
            }
        },
        "seconds": 321.0,
        "hashing": {
            "prompt_tokens": 8192,
            "floor_hashlib_sha256_ms": 0.2,
            "schemes": {
                "sha256": {"ms": 0.5, "x_floor": 2.5},
                "xxhash": {"ms": 0.3, "x_floor": 1.5},
            },
        },
        "scoring": {  # p50 0.8 ms <= 1 ms: met
            "score_tokens_p50_ms": 0.8,
            "score_tokens_p99_ms": 1.2,
            "lookup_and_score_p50_us": 100.0,
            "lookup_and_score_p99_us": 150.0,
            "dynamo": {"lookup_p50_us": 125.0, "lookup_p99_us": 300.0},
            "lookup_speedup_vs_dynamo": 1.25,
        },
        "memory": {  # 30 B met; 70 B not met; 40 B at 200k pairs: not judged (n/a)
            "kvcache_memory_1pod": {**probe, "bytes_per_pair": 30.0},
            "kvcache_memory_4pods": {**probe, "bytes_per_pair": 70.0},
            "kvcache_cost_aware_1pod": {"pairs": 200_000, "bytes_per_pair": 40.0},
            "kvcache_memory_same_size_as_dynamo": {"pairs": 2_000_000, "bytes_per_pair": 40.0},
            "dynamo_radix_tree": {"pairs": 2_000_000, "bytes_per_pair": 80.0},
            "dynamo_bytes_per_block_over_kvcache": 2.0,
        },
        "tokenization": {  # identical tokens: met
            "tokenizer_overhead": {
                "1k": {"ours_ms": 1.1, "raw_ms": 1.0, "overhead_ratio": 1.1},
                "8k": {"ours_ms": 11.0, "raw_ms": 10.0, "overhead_ratio": 1.1},
            },
            "growing_chat": {
                "turns": 32,
                "fresh_total_ms": 400.0,
                "store_total_ms": 50.0,
                "speedup": 8.0,
                "identical_tokens": True,
            },
            "score_chat_8k": {"prompt_tokens": 7000, "p50_ms": 2.0, "p99_ms": 3.0},
        },
        "ingest": {  # kvcache 1.6x Dynamo >= 1.5x: met
            "ingest": {
                "blocks_per_s": {
                    "bare_sub": 7_000_000.0,
                    "dynamo": 750_000.0,
                    "dynamo_2_threads": 800_000.0,
                    "kvcache_identity": 1_200_000.0,
                    "kvcache_identity_2_shards": 900_000.0,
                    "kvcache_dual": 100_000.0,
                },
                "publisher_send_blocks_per_s": 7_100_000.0,
                "identity_vs_dynamo": 1.6,
                "identity_vs_dynamo_2_threads": 1.5,
                "identity_2_shards_vs_dynamo": 1.2,
                "dual_vs_dynamo": 0.13,
                "trials": {
                    "dynamo": [{"blocks_per_s": 700_000.0}, {"blocks_per_s": 800_000.0}],
                    "kvcache_identity": [
                        {"blocks_per_s": 1_100_000.0},
                        {"blocks_per_s": 1_300_000.0},
                    ],
                },
            },
            "scoring_under_load": {
                "service": {
                    "idle_p99_ms": 0.9,
                    "load_p50_ms": 5.0,
                    "load_p99_ms": 45.0,
                    "p99_load_over_idle": 50.0,
                }
            },
        },
        "redis": {  # lookup 2.5x floor > 2x: not met; 150k < 200k not met; 250k met
            "floor": {"pipelined_512_get_us": 400.0},
            "lookup_512_keys_64_pods": {
                "lookup_runs_median_us": 1000.0,
                "lookup_and_score_median_us": 1100.0,
                "lookup_filtered_8_pods_median_us": 1050.0,
            },
            "lookup_vs_floor": 2.5,
            "ingest": {
                "ingest_batch64_blocks_per_s": 150_000.0,
                "ingest_batch512_blocks_per_s": 250_000.0,
            },
            "memory": {"bytes_per_block_one_entry": 90.0, "bytes_per_extra_entry": 40.0},
        },
        "load": {  # HTTP 1.5x in-process <= 2x: met; overhead 0.5x: met; 1.5x Dynamo: not met
            "workload": {"paced_blocks_per_s": 100_000},
            "conditions": {
                "in_process": _condition(1.0, 2.0, 900.0),
                "kvcache_c1": _condition(1.5, 3.0, 600.0),
                "kvcache_c4": _condition(2.0, 4.0, 1200.0),
                "in_process_idle": _condition(0.9, 1.0, 1000.0),
                "kvcache_c1_idle": _condition(1.2, 2.0, 700.0),
                "dynamo_c1": _condition(1.0, 1.5, 900.0),
                "dynamo_c4": _condition(1.1, 2.0, 2000.0),
            },
            "http_p50_over_in_process": 1.5,
            "http_overhead_ms": 0.1,
            "http_overhead_over_in_process": 0.5,
            "idle_http_p50_over_in_process": 1.33,
            "kvcache_p50_over_dynamo": 1.5,
            "wrk_kvcache_p50_over_dynamo": 1.2,
            "kvcache_throughput_over_dynamo": 0.6,
            "errors": 0,
        },
        "sim": {
            "out": str(sim_out),
            "options": {
                "workload": "shared-prefix",
                "requests": 40,
                "seed": 3,
                "fleet": {"pods": 4, "capacity_blocks": 256, "block_size": 16},
            },
            "wall_seconds": 2.5,
            "runs": [
                _sim_run("least_loaded", 10.0, 0.2, 2.0, 900.0),
                _sim_run("precise_load", 10.0, 0.6, 0.5, 1000.0),
                _sim_run("oracle", 10.0, 0.5, 0.4, 1000.0),
            ],
            "targets": [
                {"name": "sim target met", "value": 1.0, "threshold": ">= 0.95", "met": True},
                {"name": "sim target missed", "value": 4.0, "threshold": ">= 10", "met": False},
                {"name": "sim target n/a", "value": None, "threshold": "<= 1.0", "met": None},
            ],
            "self_healing": {
                "policy": "precise",
                "qps": 10.0,
                "accuracy_before_faults": 1.0,
                "accuracy_during_loss": 0.9,
                "recoveries": [
                    {"pod": 0, "at": 5.0, "seconds": 0.25},
                    {"pod": 1, "at": 7.0, "seconds": None},
                ],
            },
        },
    }


@pytest.fixture
def sim_out(tmp_path: Path) -> Path:
    """A simulator output directory holding its three PNGs (drawn here, tiny)."""
    out = tmp_path / "sim"
    out.mkdir()
    for name in scorecard.SIM_PLOTS:
        figure, ax = plt.subplots(figsize=(1, 1))
        ax.plot([0, 1], [0, 1])
        figure.savefig(out / name, dpi=20)
        plt.close(figure)
    return out


def _section(text: str, title: str) -> str:
    """The markdown of one '## title' section."""
    after = text.split(f"\n## {title}\n", 1)[1]
    return after.split("\n## ", 1)[0]


def _images(text: str, base: Path) -> list[Path]:
    return [base / link for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)]


def test_full_results_render_every_section_with_figures_and_plots(
    tmp_path: Path, sim_out: Path
) -> None:
    out = scorecard.render(_results(sim_out), tmp_path / "card.md")
    text = out.read_text(encoding="utf-8")
    for title in ("Machine", "Targets", *TITLES.values()):
        assert f"\n## {title}\n" in text, title
    assert "not run" not in text
    assert "could not be read" not in text
    # the machine, as recorded
    for fact in ("Test CPU 9000", "| CPUs | 7 |", "3.11.99", "1.25 / 0.5 / 0.75", "321 s"):
        assert fact in _section(text, "Machine"), fact
    # figures and same-run ratios come from the file
    hashing = _section(text, "Hashing")
    assert "0.500 ms" in hashing and "2.50x floor" in hashing
    assert "1.60x Dynamo" in _section(text, "Ingest vs Dynamo's indexer")
    assert "2.50x floor" in _section(text, "Redis / Valkey backend")
    sim = _section(text, "Simulator: routing policies")
    # least_loaded p90 2.0 s over precise_load's 0.5 s; hit rate 0.6 over oracle's 0.5
    assert "| least_loaded |" in sim and "4.00x" in sim and "1.20x" in sim
    assert "never recovered" in sim and "within 0.250 s" in sim
    # every plot linked is a PNG on disk, one per area (three for the simulator)
    images = _images(text, out.parent)
    names = sorted(p.name for p in images)
    assert names == sorted(
        [f"{key}.png" for key in TITLES if key != "sim"]
        + [f"sim_{name}" for name in scorecard.SIM_PLOTS]
    )
    for image in images:
        assert image.read_bytes().startswith(PNG_MAGIC), image
        assert image.parent == tmp_path / "card"
    for name in scorecard.SIM_PLOTS:  # copied, not redrawn
        assert (tmp_path / "card" / f"sim_{name}").read_bytes() == (sim_out / name).read_bytes()


def test_met_and_not_met_follow_the_thresholds(sim_out: Path) -> None:
    found = {(c.area, c.name): c.met for c in scorecard.checks(_results(sim_out))}
    assert found == {
        ("scoring", "score_tokens 8k p50"): True,
        ("memory", "bytes per pair, memory index, 1 pod/block (10,000,000 pairs)"): True,
        ("memory", "bytes per pair, memory index, 4 pods/block (10,000,000 pairs)"): False,
        ("memory", "bytes per pair, cost-aware index, 1 pod/block (200,000 pairs)"): None,
        ("tokenization", "prefix store: same tokens as fresh tokenization"): True,
        ("ingest", "kvcache identity ingest / Dynamo indexer (blocks/s)"): True,
        ("redis", "lookup 512-key prefix, 64 pods / 512 pipelined GETs"): False,
        ("redis", "ingest, identity, 64 blocks per add"): False,
        ("redis", "ingest, identity, 512 blocks per add"): True,
        ("load", "HTTP /score_tokens p50 / in-process p50, during ingest"): True,
        ("load", "HTTP overhead (HTTP p50 - in-process p50) / in-process p50, during ingest"): True,
        ("load", "kvcache HTTP p50 / Dynamo /query p50, during ingest"): False,
        ("load", "the same, both driven by wrk"): False,
        ("load", "HTTP errors"): True,
        ("sim", "sim target met"): True,
        ("sim", "sim target missed"): False,
        ("sim", "sim target n/a"): None,
    }
    assert scorecard.compare(1.0, "<=", 1.0) is True
    assert scorecard.compare(1.01, "<=", 1.0) is False
    assert scorecard.compare(1.5, ">=", 1.5) is True
    assert scorecard.compare(1.49, ">=", 1.5) is False
    assert scorecard.compare(1, "==", 0) is False
    for absent in (None, float("nan"), "1.0", True):
        assert scorecard.compare(absent, "<=", 1.0) is None


def test_summary_counts_and_marks_targets(tmp_path: Path, sim_out: Path) -> None:
    text = scorecard.render(_results(sim_out), tmp_path / "card.md").read_text()
    targets = _section(text, "Targets")
    # 8 True, 4 False, 2 None in the test above
    assert "9 of 17 targets met, 6 not met, 2 not judged (n/a)." in targets
    assert targets.count("**NOT met**") == 6
    assert "| ingest | kvcache identity ingest / Dynamo indexer (blocks/s) | 1.60x |" in targets
    redis = _section(text, "Redis / Valkey backend")
    assert "| lookup 512-key prefix, 64 pods / 512 pipelined GETs | 2.50x | <= 2.00x | " in redis
    assert "**NOT met**" in redis


def test_missing_sections_say_not_run(tmp_path: Path, sim_out: Path) -> None:
    only = {k: v for k, v in _results(sim_out).items() if k in ("machine", "hashing")}
    out = scorecard.render(only, tmp_path / "card.md")
    text = out.read_text()
    assert "Hashing" in text and "0.500 ms" in _section(text, "Hashing")
    for key, title in TITLES.items():
        if key != "hashing":
            assert "**not run**" in _section(text, title), title
            assert f"--only {key}" in _section(text, title)
    assert "not run: scoring, memory, tokenization, ingest, redis, load, sim." in text
    assert sorted(p.name for p in (tmp_path / "card").iterdir()) == ["hashing.png"]


def test_a_malformed_section_is_reported_not_fatal(tmp_path: Path, sim_out: Path) -> None:
    results = _results(sim_out)
    results["redis"] = {"floor": {}}
    results["sim"]["out"] = str(tmp_path / "gone")
    text = scorecard.render(results, tmp_path / "card.md").read_text()
    assert "**could not be read**: KeyError" in _section(text, "Redis / Valkey backend")
    sim = _section(text, "Simulator: routing policies")
    assert "Plots not available" in sim and "| precise_load |" in sim
    assert "**could not be read**" not in _section(text, "HTTP load")


def test_rerender_removes_plots_of_sections_now_missing(tmp_path: Path, sim_out: Path) -> None:
    results = _results(sim_out)
    scorecard.render(results, tmp_path / "card.md")
    assert (tmp_path / "card" / "redis.png").exists()
    del results["redis"]
    scorecard.render(results, tmp_path / "card.md")
    assert not (tmp_path / "card" / "redis.png").exists()
    assert (tmp_path / "card" / "hashing.png").exists()


def test_module_entry_point_reads_a_file_and_rejects_bad_input(
    tmp_path: Path, sim_out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "results.json"
    source.write_text(json.dumps(_results(sim_out)))
    assert scorecard.main(["--input", str(source), "--out", str(tmp_path / "s.md")]) == 0
    assert "from `results.json`" in (tmp_path / "s.md").read_text()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert scorecard.main(["--input", str(bad), "--out", str(tmp_path / "t.md")]) == 1
    assert "cannot read" in capsys.readouterr().err
    assert not (tmp_path / "t.md").exists()


def test_the_repository_results_render(tmp_path: Path) -> None:
    results = json.loads(REAL_RESULTS.read_text(encoding="utf-8"))
    text = scorecard.render(results, tmp_path / "card.md").read_text()
    assert "could not be read" not in text
    for key, title in TITLES.items():
        section = _section(text, title)
        assert ("**not run**" in section) == (key not in results), key
    for name, figure in results["hashing"]["schemes"].items():
        assert f"| hash 8k tokens: {name} | {figure['ms']:.3f} ms |" in text
    for check in scorecard.checks(results):
        assert check.measured in _section(text, "Targets")
    for image in _images(text, tmp_path):
        assert image.read_bytes().startswith(PNG_MAGIC)


def test_only_parses_section_names_in_run_order() -> None:
    assert run.parse_only("sim, hashing") == ["hashing", "sim"]
    with pytest.raises(ValueError, match=r"unknown \['hashes'\]"):
        run.parse_only("hashing,hashes")
    with pytest.raises(ValueError, match="unknown"):
        run.parse_only(",")


def test_only_merges_over_previous_results(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, bool]] = []

    def section(name: str) -> Any:
        def measure(quick: bool) -> dict[str, Any]:
            calls.append((name, quick))
            return {"figure": name}

        return measure

    # fakes stand for the benchmark sections: what is tested is the merge around them
    monkeypatch.setattr(run, "SECTIONS", {k: section(k) for k in ("hashing", "scoring", "sim")})
    previous: dict[str, Any] = {
        "hashing": {"figure": "old"},
        "scoring": {"figure": "kept"},
        "section_runs": {"scoring": {"started": "2030-01-01T00:00:00+00:00", "quick": False}},
    }
    before = copy.deepcopy(previous)
    merged = run.run_sections(["hashing", "sim"], True, previous)
    assert previous == before
    assert calls == [("hashing", True), ("sim", True)]
    assert merged["hashing"] == {"figure": "hashing"}
    assert merged["sim"] == {"figure": "sim"}
    assert merged["scoring"] == {"figure": "kept"}
    runs = merged["section_runs"]
    assert list(runs) == ["hashing", "scoring", "sim"]
    assert runs["scoring"] == previous["section_runs"]["scoring"]
    for key in ("hashing", "sim"):
        assert runs[key]["quick"] is True
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", runs[key]["started"])
        assert runs[key]["seconds"] >= 0
    assert merged["machine"]["cpus"] >= 1
    assert merged["machine"]["python"].startswith("3.")


def test_readme_benchmarks_section_links_the_scorecard() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    benchmarks = readme.split("\n## Benchmarks\n", 1)[1].split("\n## ", 1)[0]
    assert "](bench/results/scorecard.md)" in benchmarks
    assert (ROOT / "bench" / "results" / "scorecard.md").is_file()
