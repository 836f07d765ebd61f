"""Composition root: builds every component from the config, owns their lifetimes."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
from collections.abc import Iterator
from types import FrameType
from typing import Any

from kvcache.config import Config
from kvcache.events.pipeline import IngestPipeline
from kvcache.events.subscriber import Subscriber
from kvcache.indexer import Indexer
from kvcache.metrics import build_registry
from kvcache.service.http import HttpApp

log = logging.getLogger("kvcache.service")


class Service:
    """Indexer + ingest pipeline + ZMQ subscriber + HTTP app, started and stopped together."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.indexer = Indexer(config)
        events = config.events
        self.pipeline = IngestPipeline(
            self.indexer.index,
            self.indexer.scheme,
            shards=events.shards,
            queue_size=events.queue_size,
            dp_rank_in_pod_id=events.dp_rank_in_pod_id,
        )
        self.subscriber = Subscriber(
            self.pipeline.submit,
            bind=events.zmq_bind,
            connect=events.zmq_connect,
            topic_filter=events.topic_filter,
        )
        self.registry = build_registry(self.indexer.statistics, self.ingest_statistics)
        self.http = HttpApp(
            self.indexer,
            self.registry,
            max_body_bytes=config.http.max_body_bytes,
            healthy=lambda: self.subscriber.running,
            offload_scoring=config.index.backend == "redis",
        )

    def ingest_statistics(self) -> dict[str, Any]:
        """Pipeline counters plus what the transport received."""
        stats = self.pipeline.statistics()
        stats["received"] = self.subscriber.received
        return stats

    def start(self) -> None:
        """Start ingest: workers first, then the socket that feeds them."""
        self.pipeline.start()
        self.subscriber.start()

    def stop(self) -> None:
        """Stop receiving, then apply what is queued (no queued work is lost)."""
        self.subscriber.stop()
        self.pipeline.stop()

    def banner(self) -> str:
        """Where the service listens, and how to point vLLM at it."""
        http = self.config.http
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
                f"kvcache: HTTP on http://{http.host}:{http.port} "
                "(POST /score_tokens, GET /healthz, GET /metrics)",
                f"kvcache: ZMQ SUB bound on {bound}; dialling {dialled}",
                f"kvcache: keys = {self.indexer.scheme!r}",
                "kvcache: point vLLM at it with:",
                f"  {seed}vllm serve <model> --block-size {hashing.block_size} "
                f"--prefix-caching-hash-algo {algo} \\",
                f"    --kv-events-config '{events_config}'",
            ]
        )


def serve(config: Config) -> None:
    """Run the service until SIGINT/SIGTERM, then drain ingest and exit 0."""
    import uvicorn

    class _Server(uvicorn.Server):
        # uvicorn re-raises the signal after its own shutdown, which would kill the process
        # before queued events are applied; stop the server ourselves instead.
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            def stop(signum: int, frame: FrameType | None) -> None:
                self.should_exit = True

            previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Ingest threads hold the GIL in short bursts; a short switch interval keeps score latency
    # low while they run.
    sys.setswitchinterval(0.0005)
    service = Service(config)
    service.start()
    try:
        server = _Server(
            uvicorn.Config(
                service.http,
                host=config.http.host,
                port=config.http.port,
                log_level="warning",
                lifespan="off",
                access_log=False,
            )
        )
        print(service.banner(), flush=True)
        server.run()
    finally:
        service.stop()
