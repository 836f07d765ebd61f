"""Composition root: builds every component from the config, owns their lifetimes."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from types import FrameType
from typing import TYPE_CHECKING, Any

from kvcache.config import Config
from kvcache.events.pipeline import IngestPipeline
from kvcache.events.subscriber import Subscriber
from kvcache.index.protocol import Index
from kvcache.indexer import Indexer
from kvcache.metrics import build_registry
from kvcache.service.http import HttpApp, PodInspector

if TYPE_CHECKING:
    from kvcache.discovery import KubernetesPodSource, Reconciler
    from kvcache.service.grpc_server import GrpcServer

log = logging.getLogger("kvcache.service")


class Service:
    """Indexer + ingest pipeline + ZMQ subscriber + HTTP app, started and stopped together."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.indexer = Indexer(config)
        if config.tracing.enabled:
            from kvcache.index.instrumented import TracedIndex
            from kvcache.tracing import tracer

            self.indexer.tracer = tracer()  # ConfigError here if the otel extra is missing
            self.indexer.index = TracedIndex(self.indexer.index)
        events = config.events
        self.pipeline = IngestPipeline(
            self.indexer.index,
            self.indexer.scheme,
            shards=events.shards,
            queue_size=events.queue_size,
            dp_rank_in_pod_id=events.dp_rank_in_pod_id,
            priority=self.indexer.read_priority,
        )
        discovery = config.discovery
        self.subscriber = Subscriber(
            self.pipeline.submit,
            bind=events.zmq_bind,
            connect=events.zmq_connect,
            topic_filter=events.topic_filter,
            dynamic=discovery.enabled and discovery.dial,
        )
        self.reconciler: Reconciler | None = None
        self.discovery: KubernetesPodSource | None = None
        if discovery.enabled:
            from kvcache.discovery import KubernetesPodSource, Reconciler, SubscriberTarget

            self.reconciler = Reconciler(
                SubscriberTarget(self.subscriber, self.pipeline.forget_pod, dial=discovery.dial),
                discovery,
            )
            self.discovery = KubernetesPodSource(discovery, self.reconciler)
        self.registry = build_registry(
            self.indexer.statistics, self.ingest_statistics, self.http_statistics
        )
        self.pods: PodInspector = IngestPods(self.pipeline, self.indexer.index)
        self.http = HttpApp(
            self.indexer,
            self.registry,
            max_body_bytes=config.http.max_body_bytes,
            healthy=lambda: self.subscriber.running,
            ready=self.ready,
            pods=self.pods,
            token=config.http.token,
            max_tokens=config.http.max_tokens,
            max_pods=config.http.max_pods,
            offload_scoring=config.index.backend == "redis",
        )

        self.grpc: GrpcServer | None = None
        if config.grpc.port is not None:
            from kvcache.service.grpc_server import GrpcServer

            self.grpc = GrpcServer(
                self.indexer,
                host=config.grpc.host,
                port=config.grpc.port,
                token=config.http.token,
                max_workers=config.grpc.max_workers,
                max_message_bytes=config.grpc.max_message_bytes,
            )

    def ready(self) -> bool:
        """Subscribers are up and, for a shared index, its server answers (blocking)."""
        if not self.subscriber.running:
            return False
        if self.config.index.backend != "redis":
            return True
        from kvcache.index.redis import RedisIndex

        index = getattr(self.indexer.index, "inner", self.indexer.index)  # under TracedIndex
        if not isinstance(index, RedisIndex):
            return True
        stats = index.statistics()
        if stats["nodes_down"] or not stats["nodes"]:
            return False
        # A round trip to every live node; raises when one does not answer.
        # TODO(lead): a RedisIndex.ping() would be cheaper than INFO + DBSIZE.
        index.server_info()
        return True

    def ingest_statistics(self) -> dict[str, Any]:
        """Pipeline counters plus what the transport received."""
        stats = self.pipeline.statistics()
        stats["received"] = self.subscriber.received
        stats["endpoint_errors"] = self.subscriber.endpoint_errors
        stats["read_priority_waits"] = self.indexer.read_priority.waits
        if self.reconciler is not None and self.discovery is not None:
            stats["discovery"] = {**self.reconciler.statistics(), **self.discovery.statistics()}
        return stats

    @property
    def ingest_on_loop(self) -> bool:
        """Whether `start(loop)` reads the ZMQ socket on the HTTP event loop: when ingest
        applies inline (one shard) to an in-process index, so applying a message never waits
        on a network (Redis) or on a queue. Otherwise the subscriber keeps its own thread."""
        return self.pipeline.inline and self.config.index.backend != "redis"

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start ingest: workers first, then the socket that feeds them (read on ``loop``, the
        event loop serving HTTP, when given and `ingest_on_loop`: see kvcache.events.subscriber).
        """
        self.pipeline.start()
        on_loop = loop if self.ingest_on_loop else None
        if on_loop is not None:
            # HTTP reads and ingest take turns on the loop already; the read gate would make
            # ingest wait, blocking the loop, for a request suspended on that same loop.
            self.pipeline.priority = None
        self.subscriber.start(loop=on_loop)
        if self.discovery is not None:
            self.discovery.start()  # ConfigError without credentials or the k8s extra
        if self.grpc is not None:
            self.grpc.start()

    def stop(self) -> None:
        """Stop receiving, then apply what is queued (no queued work is lost)."""
        if self.grpc is not None:
            self.grpc.stop(grace=5.0)
        # The socket first: on the event loop, which no longer runs, a discovery call waiting
        # for its endpoint change is released by it (it would wait out its timeout).
        self.subscriber.stop()
        if self.discovery is not None:
            self.discovery.stop()
        self.pipeline.stop()

    def http_statistics(self) -> dict[str, Any]:
        """The HTTP API's request durations (`HttpApp.statistics`; the app is made after the
        registry it reports to)."""
        return self.http.statistics()

    def banner(self, http_address: str | None = None) -> str:
        """Where the service listens (``http_address``: as bound), and how to point vLLM at it."""
        http = self.config.http
        http_address = http_address or f"http://{http.host}:{http.port}"
        bound = ", ".join(self.subscriber.bound) or "(none)"
        dialled = ", ".join(self.config.events.zmq_connect) or "(none)"
        hashing = self.config.hashing
        algo = hashing.scheme if hashing.scheme.startswith(("sha256", "xxhash")) else "sha256"
        seed = f"PYTHONHASHSEED={hashing.seed} " if hashing.seed is not None else ""
        port = self.subscriber.bound[0].rsplit(":", 1)[-1] if self.subscriber.bound else "5557"
        events_config = (
            '{"enable_kv_cache_events": true, "publisher": "zmq", '
            f'"endpoint": "tcp://<this-host>:{port}", "topic": "kv@<pod-ip:port>@<model>"}}'
        )
        return "\n".join(
            [
                f"kvcache: HTTP on {http_address} "
                "(POST /score_tokens, /score_completions, /score_chat_completions, "
                "/v1/completions, /v1/chat/completions; GET /healthz, /readyz, /metrics, "
                "/pods, /pods/{pod}, /openapi.json; DELETE /pods/{pod})",
                *(
                    [f"kvcache: gRPC on {self.grpc.address} (indexer.v1.IndexerService)"]
                    if self.grpc is not None
                    else []
                ),
                f"kvcache: ZMQ SUB bound on {bound}; dialling {dialled}",
                f"kvcache: keys = {self.indexer.scheme!r}",
                "kvcache: point vLLM at it with:",
                f"  {seed}vllm serve <model> --block-size {hashing.block_size} "
                f"--prefix-caching-hash-algo {algo} \\",
                f"    --kv-events-config '{events_config}'",
            ]
        )


class IngestPods:
    """`PodInspector` over the ingest pipeline's per-pod state.

    Reads state the ingest workers write: a snapshot may be a batch behind, never wrong.
    """

    def __init__(self, pipeline: IngestPipeline, index: Index) -> None:
        self.pipeline = pipeline
        self.index = index

    def _counts(self) -> dict[str, dict[str, int]] | None:
        """Blocks per pod and tier, from backends that can count them (the in-process ones)."""
        count = getattr(self.index, "pod_counts", None)
        return count() if callable(count) else None

    def pods(self) -> list[dict[str, Any]]:
        """Every pod ingest knows (as `PodInfo` fields)."""
        states = self.pipeline.pod_states()
        counts = self._counts()  # after the states: never older than the sequence they show
        return [_pod_info(pod, state, counts) for pod, state in states.items()]

    def pod(self, pod: str) -> dict[str, Any] | None:
        """One pod, or None."""
        state = self.pipeline.pod_states().get(pod)
        return None if state is None else _pod_info(pod, state, self._counts())

    def clear(self, pod: str) -> int:
        """Forget the pod's ingest state and remove its index entries."""
        return self.pipeline.forget_pod(pod)


def _pod_info(
    pod: str, state: dict[str, Any], counts: dict[str, dict[str, int]] | None
) -> dict[str, Any]:
    streams: dict[str, dict[str, Any]] = state.get("streams", {})
    times = [s["last_event_time"] for s in streams.values() if s.get("last_event_time")]
    return {
        "pod": pod,
        "hash_mode": state.get("hash_mode"),
        "matched_scheme": state.get("matched_scheme"),
        "verified_events": state.get("verified_events", 0),
        "last_seq": max((s["last_seq"] for s in streams.values()), default=-1),
        "gaps": sum(s["gaps"] for s in streams.values()),
        "lost_batches": sum(s["lost_batches"] for s in streams.values()),
        "resets": sum(s["resets"] for s in streams.values()),
        "last_event_time": max(times) if times else None,
        # null where the backend cannot count (Redis: it would scan the shared keyspace)
        "blocks": None if counts is None else sum(counts.get(pod, {}).values()),
        "tiers": None if counts is None else counts.get(pod, {}),
        "streams": streams,
    }


def serve(config: Config) -> None:
    """Run the service until SIGINT/SIGTERM, then drain ingest and exit 0."""
    from kvcache.service.http_server import HttpServer
    from kvcache.service.logs import configure_logging

    configure_logging(config.logging)
    # Other threads (gRPC, discovery, a receive thread when ingest is not on the loop) hold the
    # GIL in short bursts; a short switch interval keeps the loop's latency low while they run.
    sys.setswitchinterval(0.0005)
    from kvcache.tracing import init_tracing

    service = Service(config)
    stop_tracing = init_tracing(config.tracing)
    # One event loop, made here, serves HTTP and (Service.ingest_on_loop) reads the ZMQ
    # socket: ingest and requests take turns on one thread instead of contending for the GIL.
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    stop = asyncio.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(stop.set)

    async def run() -> None:
        http = config.http
        server = HttpServer(
            service.http,
            http.host,
            http.port,
            keepalive_timeout=http.keepalive_timeout_seconds,
            head_timeout=http.head_timeout_seconds,
            shutdown_timeout=http.shutdown_timeout_seconds,
        )
        await server.start()
        print(service.banner(http_address=server.address), flush=True)
        await stop.wait()
        await server.shutdown()  # requests in progress finish first

    # signal.signal, not loop.add_signal_handler: the same code on every platform and loop.
    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        service.start(loop=loop)
        loop.run_until_complete(run())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        service.stop()
        stop_tracing()  # flushes queued spans
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())  # asyncio.to_thread's
        loop.close()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when installed (the service extra installs it: ~40 us less per request
    than asyncio's, measured with uvicorn), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
