"""The HTTP API as a plain ASGI application (no framework: the score path stays lean).

Routes and bodies are described in docs/http-api.md and in the OpenAPI spec
(`kvcache.service.openapi`, served at /openapi.json). Bad input always gets a 4xx with a message
naming the field; a 500 means a bug and is logged with its traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any, Protocol, TypeVar

import msgspec
import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from kvcache.errors import KVCacheError
from kvcache.hashing import TokenIds
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
Handler = Callable[[Scope, Receive], Awaitable[Response]]
T = TypeVar("T")
S = TypeVar("S", bound=msgspec.Struct)

MAX_TOKEN_ID = 2**32 - 1
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
"""Probes and scrapes never need the bearer token."""
_TRACE_HEADERS = frozenset(name.encode() for name in TRACE_HEADERS)


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
        self._pod_routes: dict[str, Callable[[str], Awaitable[Response]]] = {
            "GET": self._get_pod,
            "DELETE": self._clear_pod,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        if scope["type"] != "http":
            return
        path: str = scope["path"]  # percent-decoded by the server: "/pods/10.0.0.7:8000"
        method: str = scope["method"]
        try:
            if path not in OPEN_PATHS:
                self._authorize(scope)
            if method == "POST":
                # The whole scoring request (body, JSON, keys, lookup) runs ahead of bulk
                # ingest, not only the lookup: see kvcache.priority.
                with self.indexer.read_priority.reading(), self._caller_trace(scope):
                    status, body, headers = await self._dispatch(path, method, scope, receive)
            else:
                status, body, headers = await self._dispatch(path, method, scope, receive)
        except _ClientGoneError:
            return
        except _HttpError as exc:
            status, body, headers = exc.status, _encode({"error": str(exc)}), _JSON + exc.headers
        except Exception:
            log.exception("internal error on %s %s", method, path)
            status, body, headers = 500, _encode({"error": "internal server error"}), _JSON
        # A Content-Length (not chunked transfer): one write, and clients need no chunk parser.
        headers = [*headers, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _caller_trace(self, scope: Scope) -> contextlib.AbstractContextManager[None]:
        """With tracing on, the caller's W3C trace context (``traceparent`` header) parents the
        score spans; otherwise nothing (and no OpenTelemetry import)."""
        if self.indexer.tracer is None:
            return contextlib.nullcontext()
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope.get("headers", ())
            if name in _TRACE_HEADERS
        }
        return remote_parent(carrier)

    async def _dispatch(self, path: str, method: str, scope: Scope, receive: Receive) -> Response:
        methods = self._routes.get(path)
        if methods is not None:
            handler = methods.get(method)
            if handler is None:
                raise _method_not_allowed(method, methods)
            return await handler(scope, receive)
        if path.startswith("/pods/") and len(path) > len("/pods/"):
            pod_handler = self._pod_routes.get(method)
            if pod_handler is None:
                raise _method_not_allowed(method, self._pod_routes)
            return await pod_handler(path[len("/pods/") :])
        raise _HttpError(404, f"no such endpoint: {path}")

    def _authorize(self, scope: Scope) -> None:
        if self._token is None:
            return
        for name, value in scope.get("headers", ()):
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

    async def _score_tokens(self, scope: Scope, receive: Receive) -> Response:
        request, token_ids = _decode_score_tokens(await self._body(scope, receive))
        self._check_tokens(token_ids, validated=True)
        self._check_pods(request.pods)
        lora, extra = None, None
        if request.lora is not None:
            # vLLM >= 0.31 hashes the adapter's path too: it comes from the adapter config
            # (tokenization.lora_adapters), as for gRPC and the text endpoints.
            lora, extra = self.indexer.text.extras(request.model, lora=request.lora)
        detail = await self._score(token_ids, request.model, request.pods, lora, extra)
        return _scored(detail, request.pods, request.model)

    async def _score_completions(self, scope: Scope, receive: Receive) -> Response:
        request = _decode(await self._body(scope, receive), ScoreCompletionsRequest)
        if not request.prompt:
            raise _HttpError(400, "prompt must not be empty")
        return await self._score_text("completion", request.openai_body(), request.pods)

    async def _score_chat_completions(self, scope: Scope, receive: Receive) -> Response:
        request = _decode(await self._body(scope, receive), ScoreChatCompletionsRequest)
        body = request.openai_body()
        if not body["messages"]:
            raise _HttpError(400, "messages (or conversation) must be a non-empty list")
        return await self._score_text("chat", body, request.pods)

    async def _openai_completions(self, scope: Scope, receive: Receive) -> Response:
        body = _decode_object(await self._body(scope, receive))
        request = _convert(body, OpenAICompletionRequest)
        return await self._score_text("completion", body, request.pods)

    async def _openai_chat(self, scope: Scope, receive: Receive) -> Response:
        body = _decode_object(await self._body(scope, receive))
        request = _convert(body, OpenAIChatRequest)
        return await self._score_text("chat", body, request.pods)

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
        detail = await self._score(prompt.token_ids, prompt.model, pods, prompt.lora, prompt.extras)
        return _scored(detail, pods, str(body["model"]))

    async def _score(
        self,
        token_ids: TokenIds,
        model: str,
        pods: list[str] | None,
        lora: str | None,
        extra: Any = None,
    ) -> ScoreDetail:
        def score() -> ScoreDetail:
            try:
                return self.indexer.score_tokens_detailed(
                    token_ids, model, pods, lora=lora, extra=extra
                )
            except KVCacheError as exc:  # e.g. extra keys inconsistent with the tokens
                raise _HttpError(400, str(exc)) from None

        if self.offload_scoring:
            # A shared backend waits on the network (up to its timeout): keep the event loop
            # free for other requests meanwhile.
            return await asyncio.to_thread(score)
        return score()

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

    async def _healthz(self, scope: Scope, receive: Receive) -> Response:
        ok = self.healthy()
        return 200 if ok else 503, _encode({"status": "ok" if ok else "unhealthy"}), _JSON

    async def _readyz(self, scope: Scope, receive: Receive) -> Response:
        try:
            # The check may wait on a server (Redis PING): off the loop, with a deadline.
            ok = await asyncio.wait_for(asyncio.to_thread(self.ready), self.ready_timeout)
        except TimeoutError:
            ok = False
        except Exception:
            log.exception("readiness check failed")
            ok = False
        return 200 if ok else 503, _encode({"status": "ready" if ok else "not ready"}), _JSON

    async def _metrics(self, scope: Scope, receive: Receive) -> Response:
        content_type = CONTENT_TYPE_LATEST.encode()
        return 200, generate_latest(self.registry), [(b"content-type", content_type)]

    async def _openapi_json(self, scope: Scope, receive: Receive) -> Response:
        if self._openapi is None:
            from kvcache.service.openapi import render_spec

            self._openapi = render_spec().encode("utf-8")
        return 200, self._openapi, _JSON

    # -- pods -----------------------------------------------------------------------------------

    def _pods(self) -> PodInspector:
        if self.inspector is None:
            raise _HttpError(501, "pod introspection is not configured in this server")
        return self.inspector

    async def _list_pods(self, scope: Scope, receive: Receive) -> Response:
        states = self._pods().pods()
        pods = sorted((msgspec.convert(s, PodInfo) for s in states), key=lambda p: p.pod)
        return 200, _encode(PodList(pods)), _JSON

    async def _get_pod(self, pod: str) -> Response:
        state = self._pods().pod(pod)
        if state is None:
            raise _HttpError(404, f"unknown pod: {pod!r}")
        return 200, _encode(msgspec.convert(state, PodInfo)), _JSON

    async def _clear_pod(self, pod: str) -> Response:
        inspector = self._pods()
        known = inspector.pod(pod) is not None
        # A shared index may hold the pod even when this replica's ingest never saw it.
        removed = await asyncio.to_thread(inspector.clear, pod)
        if not known and removed == 0:
            raise _HttpError(404, f"unknown pod: {pod!r}")
        return 200, _encode(ClearResponse(pod, removed)), _JSON

    # -- body -----------------------------------------------------------------------------------

    async def _body(self, scope: Scope, receive: Receive) -> bytes:
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body_bytes:
                raise _HttpError(413, f"body larger than {self.max_body_bytes} bytes")
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
