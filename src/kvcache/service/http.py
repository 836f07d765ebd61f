"""The HTTP API: routes over whole requests, served by `kvcache.service.http_server` or,
as a plain ASGI application, by any ASGI server (no framework: the score path stays lean).

Routes and bodies are described in docs/http-api.md and in the OpenAPI spec
(`kvcache.service.openapi`, served at /openapi.json). Bad input always gets a 4xx with a message
naming the field; a 500 means a bug and is logged with its traceback.

A route that never waits (scoring by tokens on an in-process index, probes, pods) answers
synchronously: `HttpApp.respond` returns the response itself, and the built-in server writes it
without making a task. Routes that wait (tokenization on the pool, a shared backend, /readyz)
return an awaitable.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import msgspec
import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from kvcache.errors import KVCacheError
from kvcache.hashing import TokenIds
from kvcache.histogram import LatencyHistogram
from kvcache.indexer import Indexer, ScoreDetail
from kvcache.scoring import normalize_scores
from kvcache.service.http_models import (
    ClearResponse,
    OpenAIChatRequest,
    OpenAICompletionRequest,
    PodInfo,
    PodList,
    RawScoreTokensRequest,
    ScoreChatCompletionsRequest,
    ScoreCompletionsRequest,
    ScoreResponse,
    ScoreTokensRequest,
)
from kvcache.tokenization.errors import (
    MissingDependencyError,
    PoolOverloadedError,
    TokenizationTimeoutError,
    TokenizerNotFoundError,
)
from kvcache.tracing import TRACE_HEADERS, remote_parent

try:
    from kvcache.service import _token_json
except ImportError:  # built without a C compiler: msgspec decodes every token id
    _token_json = None  # type: ignore[assignment]

FAST_TOKENS_AVAILABLE = _token_json is not None
"""Whether /score_tokens reads token ids with the compiled parser (see `_decode_score_tokens`)."""

log = logging.getLogger("kvcache.service.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]
Response = tuple[int, bytes, Headers]
"""Status, body and headers (the server adds Content-Length)."""
Outcome = Response | Awaitable[Response]
"""A response, or for a route that waits, an awaitable of one."""
Handler = Callable[["Request"], Outcome]
T = TypeVar("T")
S = TypeVar("S", bound=msgspec.Struct)

MAX_TOKEN_ID = 2**32 - 1
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
"""Probes and scrapes never need the bearer token."""
_TRACE_HEADERS = frozenset(name.encode() for name in TRACE_HEADERS)


@dataclass(slots=True)
class Request:
    """One request as the routes see it, its body read in full."""

    method: str
    path: str
    """Percent-decoded, without the query string."""
    headers: Headers
    """Lower-case names, as received."""
    body: bytes = b""


class PodInspector(Protocol):
    """What /pods needs from ingest: per-pod state (as `PodInfo` fields) and clearing."""

    def pods(self) -> list[dict[str, Any]]:
        """Every pod known to ingest."""
        ...

    def pod(self, pod: str) -> dict[str, Any] | None:
        """One pod, or None when ingest never saw it."""
        ...

    def clear(self, pod: str) -> int:
        """Forget the pod and remove its index entries; returns the entries removed."""
        ...


class _HttpError(Exception):
    def __init__(self, status: int, message: str, headers: Headers | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or []


class _ClientGoneError(Exception):
    """The client went away before its body arrived."""


_JSON: Headers = [(b"content-type", b"application/json")]
_encode = msgspec.json.Encoder().encode
_decode_any = msgspec.json.Decoder().decode
_decode_raw_tokens = msgspec.json.Decoder(RawScoreTokensRequest).decode


class HttpApp:
    """Scoring, probes, metrics, pod introspection and the OpenAPI spec (docs/http-api.md)."""

    def __init__(
        self,
        indexer: Indexer,
        registry: CollectorRegistry,
        *,
        max_body_bytes: int = 16 * 1024 * 1024,
        max_tokens: int = 1 << 20,
        max_pods: int = 10_000,
        healthy: Callable[[], bool] = lambda: True,
        ready: Callable[[], bool] | None = None,
        ready_timeout: float = 5.0,
        pods: PodInspector | None = None,
        token: str | None = None,
        offload_scoring: bool = False,
    ) -> None:
        self.indexer = indexer
        self.registry = registry
        self.max_body_bytes = max_body_bytes
        self.max_tokens = max_tokens
        self.max_pods = max_pods
        self.healthy = healthy
        self.ready = ready or healthy
        self.ready_timeout = ready_timeout
        self.inspector = pods
        self._token = token.encode("utf-8") if token else None
        self.offload_scoring = offload_scoring
        self._openapi: bytes | None = None
        self._routes: dict[str, dict[str, Handler]] = {
            "/score_tokens": {"POST": self._score_tokens},
            "/score_completions": {"POST": self._score_completions},
            "/score_chat_completions": {"POST": self._score_chat_completions},
            "/v1/completions": {"POST": self._openai_completions},
            "/v1/chat/completions": {"POST": self._openai_chat},
            "/healthz": {"GET": self._healthz},
            "/readyz": {"GET": self._readyz},
            "/metrics": {"GET": self._metrics},
            "/openapi.json": {"GET": self._openapi_json},
            "/pods": {"GET": self._list_pods},
        }
        self._pod_routes: dict[str, Handler] = {"GET": self._get_pod, "DELETE": self._clear_pod}
        # (route, status) -> time from a request read in full to its response ready. Observed
        # and read on the serving loop only (/metrics is one of its routes): no lock.
        self._durations: dict[tuple[str, str], LatencyHistogram] = {}

    def statistics(self) -> dict[str, Any]:
        """``{"requests": {(route, status): histogram snapshot}}`` (kvcache.metrics)."""
        return {"requests": {key: h.snapshot() for key, h in list(self._durations.items())}}

    def count_refusal(self, path: str, status: int) -> None:
        """Count a request the server refused before the app saw it (a malformed request, a
        head or body over its limit); ``path`` is "" when not known yet. Its duration is 0."""
        self._observe(path, status, time.perf_counter())

    def _observe(self, path: str, status: int, started: float) -> None:
        if path in self._routes:
            route = path
        elif path.startswith("/pods/") and len(path) > len("/pods/"):
            route = "/pods/{pod}"
        else:
            route = "unmatched"  # any other path: one series, whatever clients send
        key = (route, str(status))
        histogram = self._durations.get(key)
        if histogram is None:
            histogram = self._durations[key] = LatencyHistogram()
        histogram.observe(time.perf_counter() - started)

    # -- serving ----------------------------------------------------------------------------------

    def precheck(self, method: str, path: str, headers: Headers) -> Response | None:
        """What can be refused from the request head alone (bearer token, announced body size),
        before any body is read; None when the request may go on."""
        try:
            if path not in OPEN_PATHS:
                self._authorize(headers)
            limit = self.max_body_bytes
            for name, value in headers:
                if name == b"content-length" and value.isdigit() and int(value) > limit:
                    raise _HttpError(413, f"body larger than {limit} bytes")
        except _HttpError as exc:
            self.count_refusal(path, exc.status)
            return _error(exc)
        return None

    def respond(self, request: Request) -> Outcome:
        """The response to a request that passed `precheck`: the response itself when the route
        never waits, else an awaitable of it. Never raises (a bug is a logged 500)."""
        started = time.perf_counter()
        try:
            handler = self._route(request.method, request.path)
            if request.method == "POST":
                # The whole scoring request (JSON, keys, lookup) runs ahead of bulk ingest, not
                # only the lookup: see kvcache.priority.
                with self.indexer.read_priority.reading(), self._caller_trace(request.headers):
                    outcome = handler(request)
            else:
                outcome = handler(request)
            if not isinstance(outcome, tuple):
                return self._finish(request, outcome, started)
        except Exception as exc:
            outcome = self._failure(request, exc)
        self._observe(request.path, outcome[0], started)
        return outcome

    async def _finish(
        self, request: Request, pending: Awaitable[Response], started: float
    ) -> Response:
        try:
            if request.method == "POST":
                with self.indexer.read_priority.reading(), self._caller_trace(request.headers):
                    response = await pending
            else:
                response = await pending
        except Exception as exc:
            response = self._failure(request, exc)
        self._observe(request.path, response[0], started)
        return response

    def _failure(self, request: Request, exc: Exception) -> Response:
        if isinstance(exc, _HttpError):
            return _error(exc)
        log.error("internal error on %s %s", request.method, request.path, exc_info=exc)
        return error_response(500, "internal server error")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point (the path comes percent-decoded from the server)."""
        if scope["type"] != "http":
            return
        method: str = scope["method"]
        path: str = scope["path"]
        headers: Headers = list(scope.get("headers", ()))
        response = self.precheck(method, path, headers)
        if response is None:
            try:
                body = await self._read_body(receive)
            except _ClientGoneError:
                return
            except _HttpError as exc:
                self.count_refusal(path, exc.status)
                response = _error(exc)
            else:
                outcome = self.respond(Request(method, path, headers, body))
                response = outcome if isinstance(outcome, tuple) else await outcome
        status, payload, extra = response
        # A Content-Length (not chunked transfer): one write, and clients need no chunk parser.
        extra = [*extra, (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": extra})
        await send({"type": "http.response.body", "body": payload})

    def _caller_trace(self, headers: Headers) -> contextlib.AbstractContextManager[None]:
        """With tracing on, the caller's W3C trace context (``traceparent`` header) parents the
        score spans; otherwise nothing (and no OpenTelemetry import)."""
        if self.indexer.tracer is None:
            return contextlib.nullcontext()
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in headers
            if name in _TRACE_HEADERS
        }
        return remote_parent(carrier)

    def _route(self, method: str, path: str) -> Handler:
        methods = self._routes.get(path)
        if methods is None and path.startswith("/pods/") and len(path) > len("/pods/"):
            methods = self._pod_routes
        if methods is None:
            raise _HttpError(404, f"no such endpoint: {path}")
        handler = methods.get(method)
        if handler is None:
            raise _method_not_allowed(method, methods)
        return handler

    def _authorize(self, headers: Headers) -> None:
        if self._token is None:
            return
        for name, value in headers:
            if name == b"authorization":
                scheme, _, credentials = bytes(value).partition(b" ")
                # compare_digest: the time taken must not tell how much of a guess was right.
                if scheme.lower() == b"bearer" and hmac.compare_digest(
                    credentials.strip(), self._token
                ):
                    return
                raise _HttpError(
                    401,
                    "invalid bearer token",
                    [(b"www-authenticate", b'Bearer realm="kvcache", error="invalid_token"')],
                )
        raise _HttpError(
            401,
            "this endpoint needs 'Authorization: Bearer <token>'",
            [(b"www-authenticate", b'Bearer realm="kvcache"')],
        )

    # -- scoring --------------------------------------------------------------------------------

    def _score_tokens(self, request: Request) -> Outcome:
        if self.offload_scoring:
            # A shared backend waits on the network (up to its timeout): keep the event loop
            # free for other requests meanwhile.
            return asyncio.to_thread(self._score_tokens_now, request.body)
        return self._score_tokens_now(request.body)

    def _score_tokens_now(self, body: bytes) -> Response:
        request, token_ids = _decode_score_tokens(body)
        self._check_tokens(token_ids, validated=True)
        self._check_pods(request.pods)
        lora, extra = None, None
        if request.lora is not None:
            # vLLM >= 0.31 hashes the adapter's path too: it comes from the adapter config
            # (tokenization.lora_adapters), as for gRPC and the text endpoints.
            lora, extra = self.indexer.text.extras(request.model, lora=request.lora)
        detail = self._score_now(token_ids, request.model, request.pods, lora, extra)
        return _scored(detail, request.pods, request.model)

    async def _score_completions(self, request: Request) -> Response:
        completion = _decode(request.body, ScoreCompletionsRequest)
        if not completion.prompt:
            raise _HttpError(400, "prompt must not be empty")
        return await self._score_text("completion", completion.openai_body(), completion.pods)

    async def _score_chat_completions(self, request: Request) -> Response:
        chat = _decode(request.body, ScoreChatCompletionsRequest)
        body = chat.openai_body()
        if not body["messages"]:
            raise _HttpError(400, "messages (or conversation) must be a non-empty list")
        return await self._score_text("chat", body, chat.pods)

    async def _openai_completions(self, request: Request) -> Response:
        body = _decode_object(request.body)
        pods = _convert(body, OpenAICompletionRequest).pods
        return await self._score_text("completion", body, pods)

    async def _openai_chat(self, request: Request) -> Response:
        body = _decode_object(request.body)
        return await self._score_text("chat", body, _convert(body, OpenAIChatRequest).pods)

    async def _score_text(
        self, kind: str, body: Mapping[str, Any], pods: list[str] | None
    ) -> Response:
        """Tokenize a completions/chat body as vLLM does (on the tokenizer pool), then score."""
        from kvcache.tokenization.requests import prepare_chat, prepare_completion

        self._check_pods(pods)
        text = self.indexer.text
        try:
            if kind == "chat":
                prompt = await text.pool.arun(prepare_chat, body, text)
            else:
                prompt = (await text.pool.arun(prepare_completion, body, text))[0]
        except TokenizerNotFoundError as exc:
            raise _HttpError(404, f"unknown model: {exc}") from None
        except MissingDependencyError as exc:
            raise _HttpError(501, str(exc)) from None
        except PoolOverloadedError as exc:
            raise _HttpError(503, str(exc), [(b"retry-after", b"1")]) from None
        except TokenizationTimeoutError as exc:
            raise _HttpError(504, str(exc)) from None
        except KVCacheError as exc:  # TokenizationError and friends: the caller's input
            raise _HttpError(400, str(exc)) from None
        self._check_tokens(prompt.token_ids, validated=False)
        args = (prompt.token_ids, prompt.model, pods, prompt.lora, prompt.extras)
        if self.offload_scoring:
            detail = await asyncio.to_thread(self._score_now, *args)
        else:
            detail = self._score_now(*args)
        return _scored(detail, pods, str(body["model"]))

    def _score_now(
        self,
        token_ids: TokenIds,
        model: str,
        pods: list[str] | None,
        lora: str | None,
        extra: Any = None,
    ) -> ScoreDetail:
        try:
            detail = self.indexer.score_tokens_detailed
            return detail(token_ids, model, pods, lora=lora, extra=extra)
        except KVCacheError as exc:  # e.g. extra keys inconsistent with the tokens
            raise _HttpError(400, str(exc)) from None

    def _check_tokens(self, token_ids: TokenIds, *, validated: bool) -> None:
        if len(token_ids) > self.max_tokens:
            raise _HttpError(
                400, f"request has {len(token_ids)} tokens, more than the limit {self.max_tokens}"
            )
        if not validated and token_ids and (min(token_ids) < 0 or max(token_ids) > MAX_TOKEN_ID):
            bad = next(t for t in token_ids if not 0 <= t <= MAX_TOKEN_ID)
            raise _HttpError(400, f"token id {bad} is outside 0..{MAX_TOKEN_ID}")

    def _check_pods(self, pods: list[str] | None) -> None:
        if pods is not None and len(pods) > self.max_pods:
            raise _HttpError(
                400, f"pods has {len(pods)} entries, more than the limit {self.max_pods}"
            )

    # -- probes, metrics, spec ------------------------------------------------------------------

    def _healthz(self, request: Request) -> Response:
        ok = self.healthy()
        return 200 if ok else 503, _encode({"status": "ok" if ok else "unhealthy"}), _JSON

    async def _readyz(self, request: Request) -> Response:
        try:
            # The check may wait on a server (Redis PING): off the loop, with a deadline.
            ok = await asyncio.wait_for(asyncio.to_thread(self.ready), self.ready_timeout)
        except TimeoutError:
            ok = False
        except Exception:
            log.exception("readiness check failed")
            ok = False
        return 200 if ok else 503, _encode({"status": "ready" if ok else "not ready"}), _JSON

    def _metrics(self, request: Request) -> Response:
        content_type = CONTENT_TYPE_LATEST.encode()
        return 200, generate_latest(self.registry), [(b"content-type", content_type)]

    def _openapi_json(self, request: Request) -> Response:
        if self._openapi is None:
            from kvcache.service.openapi import render_spec

            self._openapi = render_spec().encode("utf-8")
        return 200, self._openapi, _JSON

    # -- pods -----------------------------------------------------------------------------------

    def _pods(self) -> PodInspector:
        if self.inspector is None:
            raise _HttpError(501, "pod introspection is not configured in this server")
        return self.inspector

    def _list_pods(self, request: Request) -> Response:
        states = self._pods().pods()
        pods = sorted((msgspec.convert(s, PodInfo) for s in states), key=lambda p: p.pod)
        return 200, _encode(PodList(pods)), _JSON

    def _get_pod(self, request: Request) -> Response:
        pod = request.path[len("/pods/") :]
        state = self._pods().pod(pod)
        if state is None:
            raise _HttpError(404, f"unknown pod: {pod!r}")
        return 200, _encode(msgspec.convert(state, PodInfo)), _JSON

    async def _clear_pod(self, request: Request) -> Response:
        pod = request.path[len("/pods/") :]
        inspector = self._pods()
        known = inspector.pod(pod) is not None
        # A shared index may hold the pod even when this replica's ingest never saw it.
        removed = await asyncio.to_thread(inspector.clear, pod)
        if not known and removed == 0:
            raise _HttpError(404, f"unknown pod: {pod!r}")
        return 200, _encode(ClearResponse(pod, removed)), _JSON

    # -- body (ASGI) ------------------------------------------------------------------------------

    async def _read_body(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGoneError
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _HttpError(413, f"body larger than {self.max_body_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def error_response(status: int, message: str, headers: Headers | None = None) -> Response:
    """The API's error answer: ``{"error": message}`` as JSON (also the server's refusals)."""
    return status, _encode({"error": message}), _JSON + (headers or [])


def _error(exc: _HttpError) -> Response:
    return error_response(exc.status, str(exc), exc.headers)


def _scored(detail: ScoreDetail, pods: list[str] | None, model: str) -> Response:
    normalized = normalize_scores(detail.scores, pods or None)
    response = ScoreResponse(detail.scores, normalized, detail.matched_blocks, detail.blocks, model)
    return 200, _encode(response), _JSON


def _decode_score_tokens(
    body: bytes,
) -> tuple[ScoreTokensRequest | RawScoreTokensRequest, TokenIds]:
    """A /score_tokens body and its token ids (a uint32 ndarray when the compiled parser read
    them, then no Python int is made per token).

    Bodies that open with ``token_ids`` (the usual layout) have the array parsed in place and
    msgspec decodes the object without it; otherwise msgspec skips over the array as raw JSON
    and the parser reads that. Whatever the parser does not take (a bad id, odd spellings, a
    duplicate key) is decoded by msgspec as a whole, so errors and edge cases stay msgspec's.
    """
    if _token_json is not None:
        try:
            leading = _token_json.leading_token_ids(body)
            if leading is not None:
                ids, rest = leading
                request = _decode_raw_tokens(b"{" + body[rest:])
                if request.token_ids is msgspec.UNSET:  # else a duplicate key: msgspec's call
                    return request, np.frombuffer(ids, dtype=np.uint32)
            # Elsewhere in the object, msgspec keeps the last of duplicate keys where the full
            # decode validates each: only a body with one key that can read "token_ids" (an
            # escape could spell it too) takes this path.
            elif body.count(b'"token_ids"') == 1 and b"\\u" not in body:
                request = _decode_raw_tokens(body)
                if request.token_ids is not msgspec.UNSET:
                    ids = _token_json.u32_array(request.token_ids)
                    return request, np.frombuffer(ids, dtype=np.uint32)
        except (msgspec.DecodeError, ValueError):
            pass  # msgspec below names what is wrong
    full = _decode(body, ScoreTokensRequest)
    return full, full.token_ids


def _decode(body: bytes, kind: type[S]) -> S:
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise _HttpError(400, f"invalid request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise _HttpError(400, f"body is not valid JSON: {exc}") from None


def _decode_object(body: bytes) -> dict[str, Any]:
    try:
        value = _decode_any(body)
    except msgspec.DecodeError as exc:
        raise _HttpError(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise _HttpError(400, "the request body must be a JSON object")
    return value


def _convert(body: Mapping[str, Any], kind: type[S]) -> S:
    try:
        return msgspec.convert(body, kind)
    except msgspec.ValidationError as exc:
        raise _HttpError(400, f"invalid request: {exc}") from None


def _method_not_allowed(method: str, allowed: Mapping[str, object]) -> _HttpError:
    names = ", ".join(sorted(allowed))
    return _HttpError(
        405, f"method {method} not allowed here; use {names}", [(b"allow", names.encode())]
    )
