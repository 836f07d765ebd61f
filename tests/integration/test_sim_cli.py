"""`kvcache sim` end to end as a process: real engines, real ZMQ, a real in-process kvcache."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kvcache.sim.policies import POLICIES

REQUIRED = ("policy", "qps", "hit_rate", "ttft_p50", "ttft_p90", "ttft_p99", "throughput")


def run_sim(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvcache.service.cli", "sim", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.fixture(scope="module")
def sim_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("sim")
    done = run_sim("--out", str(out), "--requests", "160", "--qps", "20,60")
    assert done.returncode == 0, done.stderr
    return out, done.stdout


def test_results_json_has_every_policy_at_every_rate(sim_run: tuple[Path, str]) -> None:
    out, _ = sim_run
    rows: list[dict[str, Any]] = json.loads((out / "results.json").read_text())
    assert {(r["policy"], r["qps"]) for r in rows} == {
        (p, q) for p in POLICIES for q in (20.0, 60.0)
    }
    for row in rows:
        for field in (*REQUIRED, "prediction_accuracy", "load_imbalance"):
            assert field in row, field
        assert 0.0 <= row["hit_rate"] <= 1.0
        assert 0 < row["ttft_p50"] <= row["ttft_p90"] <= row["ttft_p99"]
        assert row["throughput"] > 0
        assert row["completed"] == row["requests"] == 160
        assert isinstance(row["preemptions"], int) and row["preemptions"] >= 0
    with open(out / "results.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(rows)
    assert {r["policy"] for r in table} == set(POLICIES)


def test_precise_beats_random_and_predictions_are_exact(sim_run: tuple[Path, str]) -> None:
    out, _ = sim_run
    rows = json.loads((out / "results.json").read_text())
    at = {(r["policy"], r["qps"]): r for r in rows}
    for qps in (20.0, 60.0):
        assert at[("precise", qps)]["hit_rate"] > at[("random", qps)]["hit_rate"] + 0.2
        assert at[("oracle", qps)]["hit_rate"] > at[("random", qps)]["hit_rate"]
    # No faults: kvcache's view of the chosen pod equals the engine's, for every decision.
    assert {r["prediction_accuracy"] for r in rows} == {1.0}
    assert all(r["gaps"] == 0 and r["resets"] == 0 and r["sync_timeouts"] == 0 for r in rows)


def test_router_tier_regime_reruns_the_top_rate_with_two_replicas(
    sim_run: tuple[Path, str],
) -> None:
    out, stdout = sim_run
    tier = {r["policy"]: r for r in json.loads((out / "router_tier.json").read_text())}
    assert set(tier) == {"least_loaded", "approximate", "precise_load"}
    assert {r["qps"] for r in tier.values()} == {60.0}
    assert all(r["completed"] == 160 for r in tier.values())
    sweep = {
        r["policy"]: r for r in json.loads((out / "results.json").read_text()) if r["qps"] == 60.0
    }
    # The load-only policy keeps no router state: replicas change nothing, the same run.
    for field in ("hit_rate", "ttft_p90", "throughput"):
        assert tier["least_loaded"][field] == sweep["least_loaded"][field]
    # Replicas of precise_load read the same event-fed index: still exact.
    assert tier["precise_load"]["prediction_accuracy"] == 1.0
    names = [t["name"] for t in json.loads((out / "targets.json").read_text())]
    assert sum("2 router replicas" in name for name in names) == 2
    assert "2 router replicas" in stdout


def test_plots_and_self_healing_demo(sim_run: tuple[Path, str]) -> None:
    out, stdout = sim_run
    for name in ("ttft_vs_qps.png", "hit_rate_vs_qps.png", "self_healing.png"):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000, name
    healing = json.loads((out / "self_healing.json").read_text())
    assert healing["accuracy_before_faults"] == 1.0
    restarts = list(healing["recoveries"])
    assert [r["pod"] for r in restarts] == [0, 1]
    assert all(r["seconds"] is not None for r in restarts)  # accuracy came back after each
    assert healing["summary"]["resets"] >= 2  # kvcache saw both publishers start over
    assert healing["timeline"] and healing["timeline"][-1]["accuracy"] == 1.0
    assert "precise" in stdout and "targets" in stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--qps", "fast"], "--qps"),
        (["--workload", "nope"], "--workload"),
        (["--policies", "random,best"], "best"),
        (["--faults", "drop=2"], "--faults"),
        (["--workload", "trace"], "--trace"),
        (["--timing", "warp=9"], "--timing"),
        (["--scrape-interval", "-1"], "--scrape-interval"),
        (["--scrape-interval", "nan"], "--scrape-interval"),
    ],
)
def test_bad_flags_are_one_clear_error(tmp_path: Path, args: list[str], message: str) -> None:
    done = run_sim("--out", str(tmp_path), *args)
    assert done.returncode == 1
    assert message in done.stderr and "Traceback" not in done.stderr


def test_help_states_the_defaults_the_run_uses() -> None:
    from kvcache.sim.fleet import DEFAULT_SCRAPE_INTERVAL
    from kvcache.sim.run import DEFAULT_QPS

    done = run_sim("--help")
    text = " ".join(done.stdout.split())  # argparse wraps lines
    assert f"rates (default {','.join(str(int(q)) for q in DEFAULT_QPS)})" in text
    assert f"(default {DEFAULT_SCRAPE_INTERVAL:g}; 0 =" in text
