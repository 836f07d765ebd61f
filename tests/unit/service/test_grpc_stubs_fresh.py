"""The checked-in gRPC modules are exactly what scripts/gen-grpc.sh makes of indexer.proto, and
the proto keeps llm-d's ``indexer.v1`` contract (names, numbers and types from its spec)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from google.protobuf.descriptor import FieldDescriptor

from kvcache.service.proto import indexer_pb2 as pb

ROOT = Path(__file__).resolve().parents[3]
PROTO_DIR = ROOT / "src" / "kvcache" / "service" / "proto"
GENERATED = ("indexer_pb2.py", "indexer_pb2.pyi", "indexer_pb2_grpc.py", "indexer_pb2_grpc.pyi")


def test_checked_in_modules_match_a_fresh_generation(tmp_path: Path) -> None:
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen-grpc.sh"), str(tmp_path)],
        check=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    fresh_dir = tmp_path / "kvcache" / "service" / "proto"
    assert sorted(p.name for p in fresh_dir.iterdir()) == sorted(GENERATED)
    for name in GENERATED:
        fresh = (fresh_dir / name).read_bytes()
        assert (PROTO_DIR / name).read_bytes() == fresh, (
            f"{name} is stale: run scripts/gen-grpc.sh and commit the result"
        )


def _fields(message: str) -> list[tuple[str, int, int, bool]]:
    descriptor = pb.DESCRIPTOR.message_types_by_name[message]
    return [(f.name, f.number, f.type, f.is_repeated) for f in descriptor.fields]


def test_get_pod_scores_is_upstreams_contract() -> None:
    assert pb.DESCRIPTOR.package == "indexer.v1"
    service = pb.DESCRIPTOR.services_by_name["IndexerService"]
    method = service.methods_by_name["GetPodScores"]
    assert method.full_name == "indexer.v1.IndexerService.GetPodScores"
    assert method.input_type.full_name == "indexer.v1.GetPodScoresRequest"
    assert method.output_type.full_name == "indexer.v1.GetPodScoresResponse"
    string, double, message = (
        FieldDescriptor.TYPE_STRING,
        FieldDescriptor.TYPE_DOUBLE,
        FieldDescriptor.TYPE_MESSAGE,
    )
    assert _fields("GetPodScoresRequest") == [
        ("prompt", 1, string, False),
        ("model_name", 2, string, False),
        ("pod_identifiers", 3, string, True),
    ]
    assert _fields("GetPodScoresResponse") == [("scores", 1, message, True)]
    assert _fields("PodScore") == [("pod", 1, string, False), ("score", 2, double, False)]
    scores = pb.DESCRIPTOR.message_types_by_name["GetPodScoresResponse"].fields_by_name["scores"]
    assert scores.message_type is not None
    assert scores.message_type.full_name == "indexer.v1.PodScore"
