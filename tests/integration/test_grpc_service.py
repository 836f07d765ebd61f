"""The gRPC API over loopback: a real server, a real Indexer, real tokenizers, real clients.

Expected token ids come from the tokenizer itself (``tokenizers``) on text rendered by hand in
the ChatML layout of the test model's template, never from kvcache's tokenization path.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).parents[1] / "unit" / "tokenization"))

import models

from kvcache import Indexer, PodEntry
from kvcache.config import Config, LoraAdapterConfig, TokenizationConfig
from kvcache.errors import ConfigError
from kvcache.hashing import RequestExtras
from kvcache.service.grpc_server import GrpcServer
from kvcache.service.proto import indexer_pb2 as pb
from kvcache.service.proto import indexer_pb2_grpc as pb_grpc

TOKEN = "s3cret-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
BLOCK = 16  # the default scheme's block size
PROMPT = "The quick brown fox jumps over the lazy dog. " * 12
CHAT_TEXT = "Tell me about prefix caching in inference engines, in detail please. " * 6


class Served:
    """A running server, its Indexer and a stub on a channel to it."""

    def __init__(self, indexer: Indexer, server: GrpcServer, port: int) -> None:
        self.indexer = indexer
        self.server = server
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.IndexerServiceStub(self.channel)

    def hold(self, ids: list[int], pod: str, blocks: int, tier: str = "gpu") -> None:
        """Put the first ``blocks`` blocks of ``ids`` on ``pod``, as events would."""
        keys = self.indexer.block_keys(ids, "m")
        assert len(keys) >= blocks
        self.indexer.index.add(None, keys[:blocks], [PodEntry(pod, tier=tier)])


def _indexer(tmp_path: Path) -> Indexer:
    tokenization = TokenizationConfig(
        tokenizers={"m": str(models.chatml_dir())},
        models_dir=None,
        hf_cache=str(tmp_path),  # empty: an unknown model is found nowhere
        trust_request_chat_template=True,
        lora_adapters={"adapter-1": LoraAdapterConfig(base_model="m", path="/adapters/one")},
    )
    return Indexer(Config(tokenization=tokenization))


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    indexer = _indexer(tmp_path)
    server = GrpcServer(indexer, host="127.0.0.1", port=0, token=TOKEN, max_workers=4)
    running = Served(indexer, server, server.start())
    yield running
    running.channel.close()
    server.stop(grace=None)


def _tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(models.chatml_dir() / "tokenizer.json"))


def _chatml(messages: list[tuple[str, str]], *, generation: bool, thinking: str = "") -> str:
    """The test template's output for plain messages, written out by hand."""
    text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages)
    return text + ("<|im_start|>assistant\n" + thinking if generation else "")


def _identity(data: bytes) -> bytes:
    return data


def _raw(channel: grpc.Channel, method: str) -> grpc.UnaryUnaryMultiCallable[bytes, bytes]:
    """A generic client call: bytes in, bytes out, no generated code involved."""
    return channel.unary_unary(
        f"/indexer.v1.IndexerService/{method}",
        request_serializer=_identity,
        response_deserializer=_identity,
    )


def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error: Any = caught.value
    return error.code(), error.details()


# -- GetPodScores (upstream's contract) -------------------------------------------------------


def test_get_pod_scores_tokenizes_the_prompt_like_a_completion(served: Served) -> None:
    ids = _tokenizer().encode(PROMPT).ids  # add_special_tokens: the post-processor adds BOS
    assert ids[0] == _tokenizer().token_to_id(models.BOS)
    assert len(ids) >= 5 * BLOCK
    served.hold(ids, "10.0.0.1:8000", 5)
    served.hold(ids, "10.0.0.2:8000", 2)
    served.hold(ids, "10.0.0.3:8000", 4, tier="cpu")
    response = served.stub.GetPodScores(
        pb.GetPodScoresRequest(prompt=PROMPT, model_name="m"), metadata=AUTH
    )
    scores = {entry.pod: entry.score for entry in response.scores}
    assert scores == {"10.0.0.1:8000": 5.0, "10.0.0.2:8000": 2.0, "10.0.0.3:8000": 3.2}

    only = served.stub.GetPodScores(
        pb.GetPodScoresRequest(
            prompt=PROMPT, model_name="m", pod_identifiers=["10.0.0.2:8000", "elsewhere"]
        ),
        metadata=AUTH,
    )
    assert [(entry.pod, entry.score) for entry in only.scores] == [("10.0.0.2:8000", 2.0)]


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def _length_delimited(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(field number, wire type, payload) of each field; 64-bit payloads are 8 raw bytes."""
    at = 0
    while at < len(data):
        tag, at = _read_varint(data, at)
        field, wire = tag >> 3, tag & 7
        if wire == 2:
            size, at = _read_varint(data, at)
            yield field, wire, data[at : at + size]
            at += size
        elif wire == 1:
            yield field, wire, data[at : at + 8]
            at += 8
        else:
            raise AssertionError(f"unexpected wire type {wire} for field {field}")


def test_get_pod_scores_is_wire_compatible_with_upstream_clients(served: Served) -> None:
    ids = _tokenizer().encode(PROMPT).ids
    served.hold(ids, "pod-a", 3)
    served.hold(ids, "pod-b", 1)
    served.hold(ids, "pod-c", 2)

    def text(field: int, value: str) -> bytes:
        payload = value.encode()
        return bytes([field << 3 | 2]) + _varint(len(payload)) + payload

    # GetPodScoresRequest as Go's protobuf runtime writes it: 0x0a prompt, 0x12 model_name,
    # 0x1a once per pod_identifiers entry.
    request = text(1, PROMPT) + text(2, "m") + text(3, "pod-a") + text(3, "pod-b")
    assert request[:1] == b"\x0a"
    raw = _raw(served.channel, "GetPodScores")(request, metadata=AUTH)

    scores: dict[str, float] = {}
    for field, wire, entry in _length_delimited(raw):
        assert (field, wire) == (1, 2)  # repeated PodScore scores = 1
        pod, score = "", 0.0
        for sub_field, sub_wire, value in _length_delimited(entry):
            if (sub_field, sub_wire) == (1, 2):
                pod = value.decode()
            elif (sub_field, sub_wire) == (2, 1):  # double score = 2: 8 bytes little-endian
                (score,) = struct.unpack("<d", value)
            else:
                raise AssertionError(f"unexpected PodScore field {sub_field}")
        scores[pod] = score
    assert scores == {"pod-a": 3.0, "pod-b": 1.0}


# -- ScoreTokens -----------------------------------------------------------------------------------


def test_score_tokens_reports_scores_normalized_scores_and_blocks(served: Served) -> None:
    ids = list(range(1000, 1000 + 6 * BLOCK + 5))
    served.hold(ids, "gpu-pod", 4)
    served.hold(ids, "cpu-pod", 5, tier="cpu")
    served.hold(ids, "short-pod", 1)
    response = served.stub.ScoreTokens(
        pb.ScoreTokensRequest(token_ids=ids, model_name="m"), metadata=AUTH
    )
    got = [(p.pod, p.score, p.normalized_score, p.matched_blocks) for p in response.pods]
    # cpu blocks weigh 0.8: 5 * 0.8 = 4.0 ties with the gpu pod's 4 blocks; min-max over
    # [4, 4, 1] gives 1, 1, 0.
    assert [(pod, score, blocks) for pod, score, _, blocks in got] == [
        ("cpu-pod", 4.0, 5),
        ("gpu-pod", 4.0, 4),
        ("short-pod", 1.0, 1),
    ]
    assert [norm for _, _, norm, _ in got] == pytest.approx([1.0, 1.0, 0.0])
    assert response.request_blocks == 6
    assert response.token_count == len(ids)


def test_score_tokens_filters_pods_and_lists_unscored_candidates(served: Served) -> None:
    ids = list(range(500, 500 + 4 * BLOCK))
    served.hold(ids, "a", 4)
    served.hold(ids, "b", 2)
    served.hold(ids, "c", 3)
    response = served.stub.ScoreTokens(
        pb.ScoreTokensRequest(token_ids=ids, pod_identifiers=["b", "z", "c"]), metadata=AUTH
    )
    got = [(p.pod, p.score, p.normalized_score, p.matched_blocks) for p in response.pods]
    assert got == [("c", 3.0, 1.0, 3), ("b", 2.0, 0.0, 2), ("z", 0.0, 0.0, 0)]


def test_score_tokens_lora_changes_the_keys(served: Served) -> None:
    ids = list(range(2000, 2000 + 3 * BLOCK))
    # What vLLM >= 0.31 hashes for the adapter: its name and the configured path.
    extras = RequestExtras(lora_name="adapter-1", lora_path="/adapters/one")
    keys = served.indexer.block_keys(ids, "m", extra=extras)
    assert keys != served.indexer.block_keys(ids, "m")
    served.indexer.index.add(None, keys, [PodEntry("lora-pod")])
    with_lora = served.stub.ScoreTokens(
        pb.ScoreTokensRequest(token_ids=ids, model_name="m", lora_name="adapter-1"), metadata=AUTH
    )
    assert [(p.pod, p.matched_blocks) for p in with_lora.pods] == [("lora-pod", 3)]
    without = served.stub.ScoreTokens(
        pb.ScoreTokensRequest(token_ids=ids, model_name="m"), metadata=AUTH
    )
    assert list(without.pods) == []
    code, details = _code(
        lambda: served.stub.ScoreTokens(
            pb.ScoreTokensRequest(token_ids=ids, lora_name="unconfigured"), metadata=AUTH
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "lora_path" in details


def test_fewer_tokens_than_a_block_score_nothing(served: Served) -> None:
    response = served.stub.ScoreTokens(pb.ScoreTokensRequest(token_ids=[1, 2, 3]), metadata=AUTH)
    assert (list(response.pods), response.request_blocks, response.token_count) == ([], 0, 3)


# -- ScoreChat ---------------------------------------------------------------------------------


def test_score_chat_renders_and_tokenizes_like_vllm(served: Served) -> None:
    chat = [("system", "You are terse."), ("user", CHAT_TEXT)]
    expected = _tokenizer().encode(_chatml(chat, generation=True), add_special_tokens=False).ids
    blocks = len(expected) // BLOCK
    assert blocks >= 4
    served.hold(expected, "full", blocks)
    served.hold(expected, "offloaded", 2, tier="cpu")
    request = pb.ScoreChatRequest(
        model_name="m",
        messages=[pb.ChatMessage(role=role, content=content) for role, content in chat],
        pod_identifiers=["full", "offloaded", "idle"],
    )
    response = served.stub.ScoreChat(request, metadata=AUTH)
    got = [(p.pod, p.score, p.normalized_score, p.matched_blocks) for p in response.pods]
    assert got == [
        ("full", float(blocks), 1.0, blocks),
        ("offloaded", pytest.approx(1.6), 0.0, 2),
        ("idle", 0.0, 0.0, 0),
    ]
    assert response.token_count == len(expected)
    assert response.request_blocks == blocks


def test_score_chat_options_reach_the_template(served: Served) -> None:
    chat = [("user", CHAT_TEXT)]
    encode = _tokenizer().encode
    messages = [pb.ChatMessage(role=role, content=content) for role, content in chat]

    def count(**fields: Any) -> int:
        request = pb.ScoreChatRequest(model_name="m", messages=messages, **fields)
        return int(served.stub.ScoreChat(request, metadata=AUTH).token_count)

    def expect(text: str) -> int:
        return len(encode(text, add_special_tokens=False).ids)

    # add_generation_prompt unset means true (vLLM's default); false must stay false.
    assert count() == expect(_chatml(chat, generation=True))
    assert count(add_generation_prompt=False) == expect(_chatml(chat, generation=False))
    thinking = "<think>\n\n</think>\n\n"
    assert count(chat_template_kwargs_json='{"enable_thinking": false}') == expect(
        _chatml(chat, generation=True, thinking=thinking)
    )
    template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
    assert count(chat_template=template) == expect(f"[user]{CHAT_TEXT}")
    tools = '[{"type": "function", "function": {"name": "lookup", "parameters": {}}}]'
    assert count(tools_json=tools) > count()  # the template lists tools in a system block


# -- errors and auth --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "message", "fragment"),
    [
        ("GetPodScores", pb.GetPodScoresRequest(prompt="hi"), "model_name is required"),
        ("GetPodScores", pb.GetPodScoresRequest(model_name="m"), "prompt is empty"),
        (
            "GetPodScores",
            pb.GetPodScoresRequest(prompt="hi", model_name="no/such-model"),
            "no/such-model",
        ),
        (
            "ScoreTokens",
            pb.ScoreTokensRequest(token_ids=[1] * 32, pod_identifiers=["a", ""]),
            "pod_identifiers[1] is empty",
        ),
        ("ScoreChat", pb.ScoreChatRequest(model_name="m"), "messages is empty"),
        (
            "ScoreChat",
            pb.ScoreChatRequest(model_name="m", messages=[pb.ChatMessage(content="x")]),
            "messages[0].role is required",
        ),
        (
            "ScoreChat",
            pb.ScoreChatRequest(
                model_name="m",
                messages=[pb.ChatMessage(role="user", content="x")],
                chat_template_kwargs_json="{oops",
            ),
            "chat_template_kwargs_json is not valid JSON",
        ),
        (
            "ScoreChat",
            pb.ScoreChatRequest(
                model_name="m",
                messages=[pb.ChatMessage(role="user", content="x")],
                chat_template_kwargs_json="[1, 2]",
            ),
            "chat_template_kwargs_json: Expected `object`",
        ),
        (
            "ScoreChat",
            pb.ScoreChatRequest(
                model_name="no/such-model", messages=[pb.ChatMessage(role="user", content="x")]
            ),
            "no/such-model",
        ),
        (
            "ScoreChat",
            pb.ScoreChatRequest(
                model_name="m",
                messages=[pb.ChatMessage(role="user", content="x")],
                chat_template="{% if %}",
            ),
            "template",
        ),
    ],
)
def test_bad_input_is_invalid_argument(
    served: Served, method: str, message: Any, fragment: str
) -> None:
    code, details = _code(lambda: getattr(served.stub, method)(message, metadata=AUTH))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in details
    assert "Traceback" not in details


def test_limits_and_malformed_messages_are_invalid_argument(served: Served) -> None:
    served.server.servicer.max_token_ids = 64
    served.server.servicer.max_pods = 2
    code, details = _code(
        lambda: served.stub.ScoreTokens(pb.ScoreTokensRequest(token_ids=[7] * 65), metadata=AUTH)
    )
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, "token_ids: 65 ids, more than 64")
    code, details = _code(
        lambda: served.stub.ScoreTokens(
            pb.ScoreTokensRequest(token_ids=[7] * 64, pod_identifiers=["a", "b", "c"]),
            metadata=AUTH,
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "more than 2" in details
    # Not a protobuf message (a truncated field) and a string that is not UTF-8.
    call = _raw(served.channel, "ScoreTokens")
    for raw in (b"\x0a\x05ab", b"\x12\x02\xff\xfe"):
        code, details = _code(lambda raw=raw: call(raw, metadata=AUTH))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed ScoreTokensRequest" in details


def test_bearer_token_is_required_when_configured(served: Served) -> None:
    request = pb.ScoreTokensRequest(token_ids=list(range(BLOCK)))
    assert served.stub.ScoreTokens(request, metadata=AUTH).request_blocks == 1
    lower = (("authorization", f"bearer {TOKEN}"),)  # the scheme is case-insensitive
    assert served.stub.ScoreTokens(request, metadata=lower).request_blocks == 1
    for metadata in (
        None,
        (("authorization", "Bearer wrong"),),
        (("authorization", TOKEN),),
        (("authorization", f"Basic {TOKEN}"),),
        (("x-api-key", TOKEN),),
    ):
        code, details = _code(lambda m=metadata: served.stub.ScoreTokens(request, metadata=m))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert "bearer token" in details
    # The check precedes everything: an unauthenticated caller learns nothing about methods.
    code, _ = _code(lambda: _raw(served.channel, "Nope")(b""))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_without_a_token_calls_need_no_metadata(tmp_path: Path) -> None:
    server = GrpcServer(_indexer(tmp_path), port=0)
    port = server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.IndexerServiceStub(channel)
            response = stub.ScoreTokens(pb.ScoreTokensRequest(token_ids=list(range(2 * BLOCK))))
            assert response.request_blocks == 2
            code, _ = _code(lambda: _raw(channel, "Nope")(b""))
            assert code == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(grace=None)


def test_oversized_messages_are_refused_not_crashed(tmp_path: Path) -> None:
    server = GrpcServer(_indexer(tmp_path), port=0, max_message_bytes=1024)
    port = server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.IndexerServiceStub(channel)
            code, _ = _code(lambda: stub.ScoreTokens(pb.ScoreTokensRequest(token_ids=[9] * 2000)))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert stub.ScoreTokens(pb.ScoreTokensRequest(token_ids=[9] * 20)).token_count == 20
    finally:
        server.stop(grace=None)


def test_a_busy_port_is_a_clear_error(served: Served, tmp_path: Path) -> None:
    busy = served.server.port
    with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{busy}"):
        GrpcServer(_indexer(tmp_path), port=busy).start()


def test_empty_token_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"grpc\.token"):
        GrpcServer(_indexer(tmp_path), token="")
