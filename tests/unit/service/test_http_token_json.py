"""/score_tokens bodies read by the compiled token parser equal what msgspec makes of them.

The parser (kvcache.service._token_json) takes only plain arrays and hands everything else to
msgspec, so the property is: for any body, the fast decode returns the same request and token
ids as a plain ``msgspec.json.decode(body, type=ScoreTokensRequest)``, or fails with the same
400 message. Bodies come from valid requests in every member order and JSON layout, with bad
ids mixed in, and from single-byte mutations of them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import MutableMapping
from typing import Any

import msgspec
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.registry import CollectorRegistry

from kvcache.blocks import PodEntry
from kvcache.config import Config
from kvcache.indexer import Indexer
from kvcache.service import _token_json
from kvcache.service.http import (
    FAST_TOKENS_AVAILABLE,
    HttpApp,
    _decode,
    _decode_score_tokens,
    _HttpError,
)
from kvcache.service.http_models import ScoreTokensRequest

U32 = st.one_of(
    st.sampled_from([0, 1, 9, 10, 99, 12_345_678, 99_999_999, 100_000_000, 2**32 - 1]),
    st.integers(0, 2**32 - 1),
    st.integers(0, 200_000),
)
BAD = st.one_of(
    st.sampled_from([-1, 2**32, 2**64, 1.5, 1.0, True, None, "1", [1], {"a": 1}]),
    st.integers(-(2**40), -1),
)
WHITESPACE = st.sampled_from(["", " ", "\n", "\t", "\r\n  "])


def _reference(body: bytes) -> object:
    try:
        request = _decode(body, ScoreTokensRequest)
    except _HttpError as exc:
        return ("error", exc.status, str(exc))
    return (list(request.token_ids), request.model, request.pods, request.lora)


def _fast(body: bytes) -> object:
    try:
        request, ids = _decode_score_tokens(body)
    except _HttpError as exc:
        return ("error", exc.status, str(exc))
    return ([int(t) for t in ids], request.model, request.pods, request.lora)


def _layout(obj: object, style: int, pad: str) -> bytes:
    if style == 0:
        text = json.dumps(obj)
    elif style == 1:
        text = json.dumps(obj, separators=(",", ":"))
    else:
        text = json.dumps(obj, indent=style - 1)
    return (pad + text + pad).encode()


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    drawn: list[int] = draw(st.lists(U32, max_size=40))
    tokens: list[Any] = list(drawn)
    spoil: bool = draw(st.booleans())
    if tokens and spoil:
        tokens[draw(st.integers(0, len(tokens) - 1))] = draw(BAD)
    members: list[tuple[str, Any]] = [("token_ids", tokens)]
    for key, value in (("model", "m"), ("pods", ["p1", "p2"]), ("lora", "sql"), ("bogus", 1)):
        if draw(st.integers(0, 3)) == 0:
            members.append((key, value))
    order = draw(st.permutations(members))
    keys = [json.dumps(key) for key, _ in order]
    if draw(st.integers(0, 9)) == 0:  # a duplicate key: msgspec keeps the last one
        order = [*order, ("token_ids", draw(st.sampled_from([[7, 8], 0, []])))]
        keys.append(draw(st.sampled_from(['"token_ids"', '"token\\u005fids"'])))
    # json.dumps of a dict would merge duplicates: lay the object out member by member.
    style = draw(st.integers(0, 3))
    pad = draw(WHITESPACE)
    inner = [
        key + ":" + _layout(value, style, pad).decode()
        for key, (_, value) in zip(keys, order, strict=True)
    ]
    text = pad + "{" + pad + ("," + pad).join(inner) + pad + "}" + pad
    raw = text.encode()
    mutation = draw(st.integers(0, 5))
    if mutation == 0 and raw:  # drop a byte
        at = draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + raw[at + 1 :]
    elif mutation == 1:  # insert a byte JSON cares about
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from(list(b',[]{}"0-.e: '))).to_bytes(1, "big") + raw[at:]
    return raw


@settings(max_examples=600, deadline=None)
@given(body=bodies())
def test_fast_decode_equals_msgspec(body: bytes) -> None:
    assert _fast(body) == _reference(body)


@settings(max_examples=300, deadline=None)
@given(tokens=st.lists(U32, max_size=300), style=st.integers(0, 3), pad=WHITESPACE)
def test_parser_reads_plain_arrays(tokens: list[int], style: int, pad: str) -> None:
    raw = _token_json.u32_array(_layout(tokens, style, pad))
    assert np.frombuffer(raw, dtype=np.uint32).tolist() == tokens


@settings(max_examples=400, deadline=None)
@given(text=st.text(alphabet="0123456789,[] -.e+\n", max_size=40))
def test_parser_accepts_only_what_msgspec_reads_the_same(text: str) -> None:
    """Whatever the parser accepts, msgspec reads as the same list of u32 (never the reverse
    obligation: odd spellings such as -0 are left to msgspec)."""
    try:
        raw = _token_json.u32_array(text.encode())
    except ValueError:
        return
    expected = msgspec.json.decode(text.encode(), type=list[int])
    assert all(0 <= t < 2**32 for t in expected)
    assert np.frombuffer(raw, dtype=np.uint32).tolist() == expected


@settings(max_examples=500, deadline=None)
@given(
    tokens=st.lists(U32, min_size=4, max_size=120),
    style=st.integers(0, 3),
    edits=st.lists(
        st.tuples(st.floats(0, 1), st.integers(0, 2), st.sampled_from(list(",[] -.0123\n"))),
        max_size=3,
    ),
)
def test_long_arrays_mutated_anywhere_read_as_msgspec_reads_them(
    tokens: list[int], style: int, edits: list[tuple[float, int, str]]
) -> None:
    """Arrays long enough to be parsed as several segments in lockstep, cut at commas: an
    insert, delete or replace anywhere (at a cut, say) is refused or read as msgspec reads it."""
    text = _layout(tokens, style, "").decode()
    for where, kind, char in edits:
        at = min(int(where * len(text)), len(text) - 1)
        text = (
            text[:at] + char + text[at:]
            if kind == 0
            else text[:at] + text[at + 1 :]
            if kind == 1
            else text[:at] + char + text[at + 1 :]
        )
    try:
        raw = _token_json.u32_array(text.encode())
    except ValueError:
        return
    assert np.frombuffer(raw, dtype=np.uint32).tolist() == msgspec.json.decode(
        text.encode(), type=list[int]
    )


def test_parses_from_several_threads_equal_the_serial_parse() -> None:
    """Long arrays parse with the GIL released: threads parsing at once each get their own."""
    import threading

    bodies = [json.dumps(list(range(n * 7, n * 7 + 3000))).encode() for n in range(6)]
    expected = [_token_json.u32_array(b) for b in bodies]
    assert len(bodies[0]) > 4096  # over the no-GIL threshold
    wrong: list[int] = []

    def worker(offset: int) -> None:
        for n in range(60):
            which = (offset + n) % len(bodies)
            if _token_json.u32_array(bodies[which]) != expected[which]:
                wrong.append(which)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not wrong
    assert np.frombuffer(expected[1], dtype=np.uint32).tolist() == list(range(7, 3007))


def test_refused_spellings_go_to_msgspec() -> None:
    cut = b"[" + b", ".join(b"12345" for _ in range(16))  # long enough to be cut in four
    for text in (
        *(b"[01]", b"[1,]", b"[-0]", b"[1.0]", b"[1e3]", b"[4294967296]", b"[1 2]"),
        *(cut + b",]", cut + b",,1]", cut + b", ,1]", cut + b" 1]", b"[," + cut[1:] + b"]"),
    ):
        try:
            _token_json.u32_array(text)
        except ValueError:
            continue
        raise AssertionError(f"{text!r} was accepted")
    # -0 is an int msgspec accepts: the request still succeeds, through msgspec.
    _, ids = _decode_score_tokens(b'{"token_ids": [-0, 5]}')
    assert list(ids) == [0, 5]


def test_usual_bodies_take_the_fast_path() -> None:
    assert FAST_TOKENS_AVAILABLE
    tokens = list(range(100_000, 108_192))
    for obj in ({"token_ids": tokens, "model": "m"}, {"model": "m", "token_ids": tokens}):
        request, ids = _decode_score_tokens(json.dumps(obj).encode())
        assert isinstance(ids, np.ndarray)
        assert ids.dtype == np.uint32
        assert ids.tolist() == tokens
        assert request.model == "m"


def _post(app: HttpApp, body: bytes) -> tuple[int, Any]:
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> MutableMapping[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    scope = {"type": "http", "method": "POST", "path": "/score_tokens", "headers": []}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], json.loads(sent[1]["body"])


def test_scores_over_http_equal_in_process_scores_in_both_layouts() -> None:
    config = Config.from_mapping({"hashing": {"scheme": "sha256_cbor", "seed": "42"}})
    indexer = Indexer(config)
    tokens = [(i * 7919) % 150_000 for i in range(8192)]
    keys = indexer.block_keys(tokens)
    indexer.index.add(None, keys[:300], [PodEntry("pod-a")])
    indexer.index.add(None, keys[:100], [PodEntry("pod-b", tier="cpu")])
    app = HttpApp(indexer, CollectorRegistry())
    expected = indexer.score_tokens(tokens)
    assert expected == {"pod-a": 300.0, "pod-b": 80.0}
    for obj in (
        {"token_ids": tokens, "model": "m"},
        {"model": "m", "pods": ["pod-b"], "token_ids": tokens},
    ):
        status, body = _post(app, json.dumps(obj).encode())
        assert status == 200
        wanted = expected if "pods" not in obj else {"pod-b": 80.0}
        assert body["scores"] == wanted
        assert body["blocks"] == 512
