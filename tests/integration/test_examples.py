"""The examples/ scripts run and print what they promise; the scheduler scorer's pure functions."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import zmq
from serve_process import serve

from kvcache import normalize_scores
from kvcache.hashing import VllmScheme

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TIMEOUT_S = 120


def _load(name: str) -> ModuleType:
    """Import an example by file (examples/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


scorer = _load("scheduler_scorer")


def _run(name: str, *args: str, stdin: str | None = None) -> dict[str, str]:
    """Run an example with this interpreter; its ``label: value`` lines as a dict."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = [line.partition(": ") for line in done.stdout.splitlines()]
    return {label: value for label, _, value in lines}


# -- the scripts ---------------------------------------------------------------------------------


def test_readme_indexes_every_example() -> None:
    readme = (EXAMPLES / "README.md").read_text()
    examples = {p.name for p in EXAMPLES.iterdir() if p.suffix in {".py", ".md"}}
    assert {"library_indexer.py", "offline_events.py", "scheduler_scorer.py", "online_vllm.md"} <= (
        examples
    )
    for name in examples:
        if name != "README.md":
            assert f"]({name})" in readme, name


def test_library_indexer_prefers_the_pod_with_the_longer_prefix() -> None:
    out = _run("library_indexer")
    # Built in the script: the prompt is 8 blocks; pod .8 holds its first 6 blocks, pod .7 only
    # the 4-block system prompt (its other blocks follow a different question).
    assert out["blocks in prompt"] == "8"
    assert json.loads(out["scores"]) == {"10.0.0.8:8000": 6.0, "10.0.0.7:8000": 4.0}
    assert json.loads(out["normalized"]) == {
        "10.0.0.8:8000": 1.0,
        "10.0.0.7:8000": 0.0,
        "10.0.0.9:8000": 0.0,
    }
    assert out["best pod"] == "10.0.0.8:8000"


def test_offline_events_scores_match_the_blocks_published() -> None:
    out = _run("offline_events")
    # Published: pod .7 stores 8 blocks and evicts 2, pod .8 stores 4; both in identity mode.
    assert out["pod 10.0.0.7:8000"] == "hash_mode=identity blocks=6"
    assert out["pod 10.0.0.8:8000"] == "hash_mode=identity blocks=4"
    assert json.loads(out["scores"]) == {"10.0.0.7:8000": 6.0, "10.0.0.8:8000": 4.0}
    assert json.loads(out["normalized"]) == {"10.0.0.7:8000": 1.0, "10.0.0.8:8000": 0.0}


def _get(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def service() -> Iterator[tuple[int, int]]:
    """`kvcache serve` (sha256_cbor, seed 42) as a process: (http port, zmq port)."""
    with serve(["--hash-scheme", "sha256_cbor", "--hash-seed", "42"]) as running:
        yield running.http_port, running.zmq_port


PROMPT = list(range(500, 500 + 8 * 16))  # 8 blocks of 16 tokens
POD_A, POD_B, POD_C = "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"


@pytest.fixture(scope="module")
def published(service: tuple[int, int]) -> int:
    """Pod A caches all 8 blocks of PROMPT, pod B the first 2, pod C nothing; the http port."""
    http_port, zmq_port = service
    offline = _load("offline_events")
    keys = VllmScheme("sha256_cbor", seed="42", block_size=16).block_keys(PROMPT)
    context: zmq.Context[Any] = zmq.Context()
    try:
        endpoint = f"tcp://127.0.0.1:{zmq_port}"
        offline.DummyEngine(context, endpoint, POD_A).publish(
            offline.BlockStored(keys, None, PROMPT, 16)
        )
        offline.DummyEngine(context, endpoint, POD_B).publish(
            offline.BlockStored(keys[:2], None, PROMPT[:32], 16)
        )
        deadline = time.monotonic() + 20
        while True:
            pods = {p["pod"]: p for p in _get(http_port, "/pods")["pods"]}
            if all(pods.get(pod, {}).get("last_seq") == 0 for pod in (POD_A, POD_B)):
                break
            assert time.monotonic() < deadline, pods
            time.sleep(0.05)
    finally:
        context.destroy(linger=0)
    return http_port


def _choose(port: int, loads: dict[str, int], kv_weight: float, load_weight: float) -> str:
    args = ["--url", f"http://127.0.0.1:{port}"]
    args += ["--kv-weight", str(kv_weight), "--load-weight", str(load_weight)]
    for pod, depth in loads.items():
        args += ["--pod", f"{pod}={depth}"]
    return _run("scheduler_scorer", *args, stdin=json.dumps(PROMPT))["picked"]


def test_scheduler_scorer_follows_the_cache_when_loads_are_equal(published: int) -> None:
    assert _choose(published, {POD_A: 2, POD_B: 2, POD_C: 2}, 2.0, 1.0) == POD_A


def test_scheduler_scorer_weighs_cache_against_load(published: int) -> None:
    # kv: A 1.0, B 0.0 (2 of 8 blocks is the minimum), C 0.0 (no score).
    # load (inverse min-max of 10, 1, 0): A 0.0, B 0.9, C 1.0.
    loads = {POD_A: 10, POD_B: 1, POD_C: 0}
    assert _choose(published, loads, 2.0, 1.0) == POD_A  # 2.0 vs 0.9 vs 1.0
    assert _choose(published, loads, 1.0, 2.0) == POD_C  # 1.0 vs 1.8 vs 2.0


def test_scheduler_scorer_prints_each_pods_parts(published: int) -> None:
    out = _run(
        "scheduler_scorer",
        "--url",
        f"http://127.0.0.1:{published}",
        "--pod",
        f"{POD_A}=0",
        "--pod",
        f"{POD_B}=4",
        stdin=json.dumps(PROMPT),
    )
    assert out[POD_A] == "cached=8 kv=1.00 queue=0 load=1.00 total=3.00"
    assert out[POD_B] == "cached=2 kv=0.00 queue=4 load=0.00 total=0.00"


# -- the scheduler scorer's pure functions -------------------------------------------------------


def test_normalize_min_max_over_scored_candidates() -> None:
    assert scorer.normalize({"a": 2.0, "b": 4.0, "c": 3.0}, ["a", "b", "c"]) == {
        "a": 0.0,
        "b": 1.0,
        "c": 0.5,
    }


def test_normalize_single_scored_pod_is_one_and_absent_pods_zero() -> None:
    assert scorer.normalize({"a": 3.0}, ["a", "b"]) == {"a": 1.0, "b": 0.0}


def test_normalize_all_equal_scores_are_one() -> None:
    assert scorer.normalize({"a": 5.0, "b": 5.0}, ["a", "b", "c"]) == {
        "a": 1.0,
        "b": 1.0,
        "c": 0.0,
    }


def test_normalize_without_scores_gives_zero_and_ignores_other_pods() -> None:
    assert scorer.normalize({}, ["a", "b"]) == {"a": 0.0, "b": 0.0}
    # A pod the scheduler did not ask about must not move the range.
    assert scorer.normalize({"a": 2.0, "b": 4.0, "x": 100.0}, ["a", "b"]) == {"a": 0.0, "b": 1.0}


def test_normalize_agrees_with_the_library() -> None:
    cases = [{"a": 1.0, "b": 7.0, "c": 2.5, "d": 7.0}, {"a": 0.8}, {"a": 4.0, "b": 3.2}]
    for scores in cases:
        candidates = [*scores, "z"]
        assert scorer.normalize(scores, candidates) == normalize_scores(scores, candidates)


def test_load_scores_prefer_the_shortest_queue() -> None:
    pods = ["a", "b", "c"]
    assert scorer.load_scores({"a": 0, "b": 5, "c": 10}, pods) == {"a": 1.0, "b": 0.5, "c": 0.0}
    assert scorer.load_scores({"a": 3, "b": 3, "c": 3}, pods) == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert scorer.load_scores({"a": 3}, pods) == {"a": 1.0, "b": 0.0, "c": 0.0}  # unknown: worst


def test_combine_sums_weighted_scores_and_pick_breaks_ties_by_pod_id() -> None:
    kv = {"a": 1.0, "b": 0.5}
    load = {"b": 1.0, "c": 1.0}
    totals = scorer.combine([(2.0, kv), (1.0, load)], ["a", "b", "c"])
    assert totals == {"a": 2.0, "b": 2.0, "c": 1.0}
    assert scorer.pick(totals) == "a"
    assert scorer.pick({"b": 1.0, "c": 3.0}) == "c"
    with pytest.raises(ValueError, match="no candidate"):
        scorer.pick({})
