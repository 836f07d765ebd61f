"""The Service wires discovery, tracing and the read-priority gate from the config."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from k8s_recordings import DATA
from test_discovery_source import FakeApiServer, Reply

from kvcache.config import Config
from kvcache.index.instrumented import TracedIndex
from kvcache.service.app import Service


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        yield server


def _kubeconfig(path: Path, url: str) -> Path:
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": url}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    return path


def test_discovered_ready_pods_are_dialled_by_the_service(
    api: FakeApiServer, tmp_path: Path
) -> None:
    api.lists = [Reply(body=(DATA / "initial_list.json").read_bytes())]
    config = Config.from_mapping(
        {
            "events": {"zmq_bind": ["tcp://127.0.0.1:0"]},
            "discovery": {
                "enabled": True,
                "kubeconfig": str(_kubeconfig(tmp_path / "kubeconfig", api.url)),
                "retry_seconds": 0.01,
            },
        }
    )
    service = Service(config)
    assert service.discovery is not None and service.reconciler is not None
    service.start()
    try:
        assert service.discovery.wait_synced(20)
        deadline = time.monotonic() + 10
        wanted = {"tcp://10.244.3.21:5557", "tcp://10.244.1.40:5557", "tcp://10.244.2.9:5557"}
        while set(service.subscriber.endpoints) != wanted and time.monotonic() < deadline:
            time.sleep(0.02)
        # the three Running + Ready pods; the Pending one without an IP is not dialled
        assert set(service.subscriber.endpoints) == wanted
        stats = service.ingest_statistics()
        assert stats["discovery"]["connected_pods"] == 3
    finally:
        service.stop()
    assert not service.discovery.running


def test_tracing_wraps_the_index_and_scoring_shares_the_priority_gate() -> None:
    service = Service(
        Config.from_mapping(
            {"events": {"zmq_bind": ["tcp://127.0.0.1:0"]}, "tracing": {"enabled": True}}
        )
    )
    assert isinstance(service.indexer.index, TracedIndex)
    assert service.indexer.tracer is not None
    assert service.pipeline.priority is service.indexer.read_priority
    service.start()
    try:
        assert service.ready()
        assert service.indexer.score_tokens(list(range(64))) == {}
    finally:
        service.stop()
