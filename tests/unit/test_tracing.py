"""OpenTelemetry spans with upstream's names and attributes, recorded by the SDK's in-memory
exporter; the disabled path imports nothing; a missing extra is a clear ConfigError; the OTLP
exporter reaches a real gRPC collector on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import msgspec
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode, Tracer
from prometheus_client.registry import CollectorRegistry

from kvcache.blocks import KeyType, PodEntry
from kvcache.config import Config
from kvcache.errors import IndexOperationError
from kvcache.events.pipeline import IngestPipeline
from kvcache.index.instrumented import TracedIndex
from kvcache.index.memory import MemoryIndex
from kvcache.index.protocol import Index
from kvcache.indexer import Indexer
from kvcache.tracing import TracingConfig, init_tracing, tracer_provider

A_GPU, B_CPU = PodEntry("pod-a", "gpu"), PodEntry("pod-b", "cpu")


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer(exporter: InMemorySpanExporter) -> Iterator[Tracer]:
    provider = TracerProvider()  # always samples
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("kvcache")
    provider.shutdown()


def _only(spans: tuple[ReadableSpan, ...], name: str) -> ReadableSpan:
    found = [span for span in spans if span.name == name]
    assert len(found) == 1, [span.name for span in spans]
    return found[0]


def _attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def test_score_tokens_spans_nest_with_upstream_attributes(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    indexer = Indexer(Config.from_mapping({"hashing": {"block_size": 4}}))
    tokens = list(range(18))  # 4 full blocks, 2 tokens left over
    keys = indexer.block_keys(tokens, "m")
    indexer.index.add(None, keys[:3], [A_GPU])
    indexer.index.add(None, keys[:2], [B_CPU])
    plain = indexer.score_tokens(tokens, "m", ["pod-a", "pod-b", "pod-c"])
    indexer.index = TracedIndex(indexer.index, tracer)
    indexer.tracer = tracer
    detail = indexer.score_tokens_detailed(tokens, "m", ["pod-a", "pod-b", "pod-c"])
    # tracing changes nothing in the answer: pod-a 3 gpu blocks, pod-b 2 cpu blocks at 0.8
    assert detail.scores == plain == {"pod-a": 3.0, "pod-b": 1.6}
    assert detail.matched_blocks == {"pod-a": 3, "pod-b": 2}

    spans = exporter.get_finished_spans()
    top = _only(spans, "llm_d.kv_cache.score_tokens")
    assert _attrs(top) == {
        "gen_ai.request.model": "m",
        "llm_d.kv_cache.pod_count": 3,
        "llm_d.kv_cache.token_count": 18,
        "llm_d.kv_cache.block_keys.count": 4,
        "llm_d.kv_cache.blocks_found": 3,
        "llm_d.kv_cache.block_hit_ratio": 0.75,
    }
    lookup = _only(spans, "llm_d.kv_cache.index")
    assert _attrs(lookup) == {
        "llm_d.kv_cache.index.lookup.block_count": 4,
        "llm_d.kv_cache.lookup.pod_filter_count": 3,
        "llm_d.kv_cache.lookup.cache_hit": True,
        "llm_d.kv_cache.lookup.blocks_found": 3,
    }
    compute = _only(spans, "llm_d.kv_cache.scorer.compute")
    attrs = _attrs(compute)
    assert attrs.pop("llm_d.kv_cache.score.avg") == pytest.approx((3.0 + 1.6) / 2)
    assert attrs == {
        "llm_d.kv_cache.scorer.algorithm": "LongestPrefix",
        "llm_d.kv_cache.scorer.key_count": 4,
        "llm_d.kv_cache.score.max": 3.0,
        "llm_d.kv_cache.scorer.pods_scored": 2,
    }
    for child in (lookup, compute):
        assert child.parent is not None and top.context is not None
        assert child.parent.span_id == top.context.span_id
    # the traced path feeds the same metrics as the plain one
    assert indexer.statistics()["read_path"]["score_requests"] == 2


def test_short_prompt_and_cold_index(tracer: Tracer, exporter: InMemorySpanExporter) -> None:
    indexer = Indexer(Config.from_mapping({"hashing": {"block_size": 4}}))
    indexer.tracer = tracer
    assert indexer.score_tokens([1, 2, 3], "m") == {}  # less than one block
    assert indexer.score_tokens(list(range(8)), "m") == {}  # two blocks, nothing cached
    first, second = (s for s in exporter.get_finished_spans() if s.name.endswith("score_tokens"))
    assert _attrs(first)["llm_d.kv_cache.block_keys.count"] == 0
    assert "llm_d.kv_cache.blocks_found" not in _attrs(first)
    assert _attrs(second)["llm_d.kv_cache.block_hit_ratio"] == 0.0
    compute = _only(exporter.get_finished_spans(), "llm_d.kv_cache.scorer.compute")
    assert "llm_d.kv_cache.score.max" not in _attrs(compute)  # no pod scored


def test_add_and_evict_spans(tracer: Tracer, exporter: InMemorySpanExporter) -> None:
    index = TracedIndex(MemoryIndex(), tracer)
    assert isinstance(index, Index)
    index.add([10, 11], [1, 2], iter([A_GPU, B_CPU]))  # a one-shot iterable is fine
    add = _only(exporter.get_finished_spans(), "llm_d.kv_cache.index.add")
    assert _attrs(add) == {
        "llm_d.kv_cache.index.add.engine_key_count": 2,
        "llm_d.kv_cache.index.add.request_key_count": 2,
        "llm_d.kv_cache.index.add.pod_entry_count": 2,
        "llm_d.kv_cache.index.add.device_tier_count": 2,
    }
    exporter.clear()
    index.evict(10, KeyType.ENGINE, [A_GPU])
    assert index.lookup([1, 2]) == [frozenset({B_CPU}), frozenset({A_GPU, B_CPU})]
    index.evict_many([1, 2], KeyType.REQUEST, [B_CPU])
    assert index.lookup([1, 2]) == []
    evicts = [s for s in exporter.get_finished_spans() if s.name == "llm_d.kv_cache.index.evict"]
    assert [_attrs(span) for span in evicts] == [
        {
            "llm_d.kv_cache.index.evict.key_type": "engine",
            "llm_d.kv_cache.index.evict.key_count": 1,
            "llm_d.kv_cache.index.evict.pod_entry_count": 1,
            "llm_d.kv_cache.index.evict.device_tier_count": 1,
        },
        {
            "llm_d.kv_cache.index.evict.key_type": "request",
            "llm_d.kv_cache.index.evict.key_count": 2,
            "llm_d.kv_cache.index.evict.pod_entry_count": 1,
            "llm_d.kv_cache.index.evict.device_tier_count": 1,
        },
    ]
    lookups = [s for s in exporter.get_finished_spans() if s.name == "llm_d.kv_cache.index"]
    assert [_attrs(s)["llm_d.kv_cache.lookup.cache_hit"] for s in lookups] == [True, False]
    assert [_attrs(s)["llm_d.kv_cache.lookup.pod_filter_count"] for s in lookups] == [0, 0]


def test_ingest_of_a_real_capture_through_a_traced_index(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    capture = Path(__file__).parents[1] / "data" / "captures" / "vllm-0.32-sha256-pickle-default"
    frames = [
        [bytes.fromhex(f) for f in json.loads(line)["frames_hex"]]
        for line in (capture / "frames.jsonl").read_text().splitlines()
    ]
    config = Config.from_mapping({"hashing": {"block_size": 32}})
    plain, inner = MemoryIndex(), MemoryIndex()
    scheme = Indexer(config).scheme
    index = TracedIndex(inner, tracer)
    for pipeline in (
        IngestPipeline(plain, scheme),
        IngestPipeline(index, scheme),  # one shard: applied inline
    ):
        for message in frames:
            pipeline.submit(message)
        assert pipeline.statistics()["pods_by_hash_mode"]["identity"] == 1
    # the wrapper changes nothing: same index afterwards, call for call
    assert index.statistics() == plain.statistics()
    assert index.pod_counts() == plain.pod_counts()
    # and its spans account for every key the backend was given
    spans = exporter.get_finished_spans()
    adds = [_attrs(s) for s in spans if s.name == "llm_d.kv_cache.index.add"]
    evicts = [_attrs(s) for s in spans if s.name == "llm_d.kv_cache.index.evict"]
    counted = inner.statistics()
    added = sum(a["llm_d.kv_cache.index.add.request_key_count"] for a in adds)
    evicted = sum(a["llm_d.kv_cache.index.evict.key_count"] for a in evicts)
    assert (added, evicted) == (counted["admitted_keys"], counted["evicts"])
    assert added > 0 and evicted > 0


def test_failed_call_marks_its_span(tracer: Tracer, exporter: InMemorySpanExporter) -> None:
    index = TracedIndex(MemoryIndex(), tracer)
    with pytest.raises(IndexOperationError):
        index.add(None, [1], [])  # no entries
    add = _only(exporter.get_finished_spans(), "llm_d.kv_cache.index.add")
    assert add.status.status_code is StatusCode.ERROR
    assert any(event.name == "exception" for event in add.events)


def test_everything_else_is_delegated(tracer: Tracer, exporter: InMemorySpanExporter) -> None:
    inner = MemoryIndex()
    index = TracedIndex(inner, tracer)
    index.add([7], [1], [A_GPU])
    assert index.request_key(7) == 1
    assert index.statistics() == inner.statistics()
    assert index.pod_counts() == inner.pod_counts() == {"pod-a": {"gpu": 1}}  # not in Index
    assert index.clear("pod-a") == 1
    assert inner.lookup([1]) == []
    with pytest.raises(AttributeError):
        _ = index.no_such_method
    assert {s.name for s in exporter.get_finished_spans()} == {"llm_d.kv_cache.index.add"}


def test_config_defaults_are_upstreams_and_ratio_is_bounded() -> None:
    config = TracingConfig()
    assert not config.enabled
    assert (config.service_name, config.endpoint, config.exporter, config.sample_ratio) == (
        "llm-d-kv-cache",
        "localhost:4317",
        "otlp",
        0.1,
    )
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"sample_ratio": 1.5}, TracingConfig)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"exporter": "zipkin"}, TracingConfig)


def test_sample_ratio_decides_root_spans() -> None:
    for ratio, recording in ((0.0, False), (1.0, True)):
        provider = tracer_provider(
            TracingConfig(enabled=True, exporter="console", sample_ratio=ratio)
        )
        span = provider.get_tracer("t").start_span("root")
        assert span.is_recording() is recording
        span.end()
        provider.shutdown()


def test_disabled_is_a_no_op_without_opentelemetry() -> None:
    # A fresh interpreter: nothing imports OpenTelemetry on the disabled path, and a global SDK
    # provider installed by the host sees no span from an Indexer without a tracer.
    script = """
        import json, sys
        from kvcache.tracing import TracingConfig, init_tracing
        from kvcache.indexer import Indexer
        from kvcache.blocks import PodEntry

        shutdown = init_tracing(TracingConfig())
        indexer = Indexer()
        keys = indexer.block_keys(list(range(64)))
        indexer.index.add(None, keys, [PodEntry("p")])
        assert indexer.score_tokens(list(range(64))) == {"p": 4.0}
        shutdown()
        imported = sorted(m for m in sys.modules if m.startswith("opentelemetry"))

        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        indexer.score_tokens(list(range(64)))
        untraced = len(exporter.get_finished_spans())
        from kvcache.tracing import tracer
        indexer.tracer = tracer()
        indexer.score_tokens(list(range(64)))
        traced = sorted(s.name for s in exporter.get_finished_spans())
        print(json.dumps({"imported": imported, "untraced": untraced, "traced": traced}))
    """
    out = _run(script)
    assert out == {
        "imported": [],
        "untraced": 0,
        "traced": ["llm_d.kv_cache.score_tokens", "llm_d.kv_cache.scorer.compute"],
    }


def test_enabled_without_the_extra_is_a_config_error() -> None:
    script = """
        import json, sys
        sys.modules["opentelemetry"] = None  # as if kvcache[otel] were not installed
        from kvcache.errors import ConfigError
        from kvcache.index.memory import MemoryIndex
        from kvcache.index.instrumented import TracedIndex
        from kvcache.tracing import TracingConfig, init_tracing
        errors = []
        for call in (
            lambda: init_tracing(TracingConfig(enabled=True)),
            lambda: TracedIndex(MemoryIndex()),
        ):
            try:
                call()
            except ConfigError as exc:
                errors.append([exc.field, str(exc)])
        print(json.dumps(errors))
    """
    errors = _run(script)
    assert len(errors) == 2
    for field, message in errors:
        assert field == "tracing.enabled"
        assert "pip install 'kvcache[otel]'" in message


def test_init_tracing_installs_the_provider_and_shutdown_flushes() -> None:
    script = """
        import json
        from opentelemetry import trace
        from kvcache.blocks import PodEntry
        from kvcache.index.instrumented import TracedIndex
        from kvcache.index.memory import MemoryIndex
        from kvcache.tracing import TracingConfig, init_tracing
        config = TracingConfig(
            enabled=True, exporter="console", service_name="svc-x", sample_ratio=1.0
        )
        shutdown = init_tracing(config)
        sampler = trace.get_tracer_provider().sampler.get_description()
        TracedIndex(MemoryIndex()).add(None, [1], [PodEntry("p")])
        shutdown()  # flushes the batch processor to stdout
        print(json.dumps({"sampler": sampler}))
    """
    *console, last = _stdout(script).strip().splitlines()
    assert "TraceIdRatioBased{1.0}" in json.loads(last)["sampler"]
    exported = json.loads("\n".join(console))
    assert exported["name"] == "llm_d.kv_cache.index.add"
    assert exported["resource"]["attributes"]["service.name"] == "svc-x"
    assert exported["attributes"]["llm_d.kv_cache.index.add.request_key_count"] == 1


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps what it is sent."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.received = threading.Event()

    def Export(  # noqa: N802 (the generated service's method name)
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        self.received.set()
        return trace_service_pb2.ExportTraceServiceResponse()


def test_otlp_exporter_reaches_a_real_collector() -> None:
    collector = _Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        config = TracingConfig(enabled=True, endpoint=f"http://127.0.0.1:{port}", sample_ratio=1.0)
        provider = tracer_provider(config)
        index = TracedIndex(MemoryIndex(), provider.get_tracer("kvcache.index"))
        index.add(None, [1, 2], [A_GPU])
        provider.shutdown()  # flushes the batch
        assert collector.received.wait(30)
    finally:
        server.stop(None)
    (request,) = collector.requests
    (resource_spans,) = request.resource_spans
    resource = {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}
    assert resource["service.name"] == "llm-d-kv-cache"
    (scope_spans,) = resource_spans.scope_spans
    assert scope_spans.scope.name == "kvcache.index"
    (span,) = scope_spans.spans
    assert span.name == "llm_d.kv_cache.index.add"


def test_disabled_init_returns_a_callable_that_does_nothing() -> None:
    shutdown = init_tracing(TracingConfig(enabled=False))
    assert shutdown() is None


def _stdout(script: str) -> str:
    """What ``script`` prints when run by a fresh interpreter (which must exit 0)."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _run(script: str) -> Any:
    """The JSON value on the last line ``script`` prints."""
    return json.loads(_stdout(script).strip().splitlines()[-1])


def test_grpc_callers_trace_context_parents_the_score_span(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    """A router's W3C ``traceparent`` in the gRPC metadata makes kvcache's score span its child
    (same trace id, the caller's span as parent); without one the span is a root."""
    from kvcache.service.grpc_server import GrpcServer
    from kvcache.service.proto import indexer_pb2 as pb
    from kvcache.service.proto import indexer_pb2_grpc as pb_grpc

    indexer = Indexer()
    indexer.tracer = tracer
    server = GrpcServer(indexer, host="127.0.0.1", port=0, max_workers=2)
    port = server.start()
    trace_id, parent_id = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7
    traceparent = f"00-{trace_id:032x}-{parent_id:016x}-01"
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.IndexerServiceStub(channel)
            request = pb.ScoreTokensRequest(token_ids=list(range(64)), model_name="m")
            stub.ScoreTokens(request, metadata=(("traceparent", traceparent),))
            stub.ScoreTokens(request)
    finally:
        server.stop(grace=None)
    child, root = [s for s in exporter.get_finished_spans() if s.name.endswith("score_tokens")]
    assert child.context is not None and child.parent is not None
    assert (child.context.trace_id, child.parent.span_id) == (trace_id, parent_id)
    assert child.parent.is_remote
    assert root.parent is None and root.context is not None
    assert root.context.trace_id != trace_id


def test_remote_parent_without_traceparent_imports_nothing() -> None:
    script = """
        import json, sys
        from kvcache.tracing import remote_parent
        with remote_parent({"tracestate": "x=1"}):
            pass
        print(json.dumps(sorted(m for m in sys.modules if m.startswith("opentelemetry"))))
    """
    assert _run(script) == []


def test_http_callers_trace_context_parents_the_score_span(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    """The same over HTTP: a ``traceparent`` header parents kvcache's score span."""
    import asyncio

    from kvcache.service.http import HttpApp

    indexer = Indexer()
    indexer.tracer = tracer
    app = HttpApp(indexer, CollectorRegistry())
    trace_id, parent_id = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
    body = json.dumps({"token_ids": list(range(64)), "model": "m"}).encode()

    def post(headers: list[tuple[bytes, bytes]]) -> int:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/score_tokens", "headers": headers}
        asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
        return int(sent[0]["status"])

    traceparent = f"00-{trace_id:032x}-{parent_id:016x}-01".encode()
    assert post([(b"content-type", b"application/json"), (b"traceparent", traceparent)]) == 200
    assert post([(b"content-type", b"application/json")]) == 200
    child, root = [s for s in exporter.get_finished_spans() if s.name.endswith("score_tokens")]
    assert child.context is not None and child.parent is not None
    assert (child.context.trace_id, child.parent.span_id) == (trace_id, parent_id)
    assert root.parent is None
