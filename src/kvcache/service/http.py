"""The HTTP API as a plain ASGI application (no framework: the score path stays lean)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Annotated, Any

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from kvcache.errors import KVCacheError
from kvcache.indexer import Indexer

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

TokenId = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]


class ScoreTokensRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Body of POST /score_tokens."""

    token_ids: list[TokenId]
    model: str = ""
    pods: list[str] | None = None
    lora: str | None = None


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


_JSON = [(b"content-type", b"application/json")]
_encode = msgspec.json.Encoder().encode
_decode_score = msgspec.json.Decoder(ScoreTokensRequest).decode


class HttpApp:
    """Routes: POST /score_tokens, GET /healthz, GET /metrics."""

    def __init__(
        self,
        indexer: Indexer,
        registry: CollectorRegistry,
        *,
        max_body_bytes: int = 16 * 1024 * 1024,
        healthy: Callable[[], bool] = lambda: True,
        offload_scoring: bool = False,
    ) -> None:
        self.indexer = indexer
        self.offload_scoring = offload_scoring
        self.registry = registry
        self.max_body_bytes = max_body_bytes
        self.healthy = healthy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        if scope["type"] != "http":
            return
        path = scope["path"]
        method = scope["method"]
        try:
            if path == "/score_tokens":
                _allow(method, "POST")
                body = await self._body(scope, receive)
                if self.offload_scoring:
                    # A shared backend waits on the network (up to its timeout): keep the
                    # event loop free for other requests meanwhile.
                    result = await asyncio.to_thread(self._score_tokens, body)
                else:
                    result = self._score_tokens(body)
                await _respond(send, 200, _encode(result), _JSON)
            elif path == "/healthz":
                _allow(method, "GET")
                ok = self.healthy()
                payload = {"status": "ok" if ok else "unhealthy"}
                await _respond(send, 200 if ok else 503, _encode(payload), _JSON)
            elif path == "/metrics":
                _allow(method, "GET")
                metrics = generate_latest(self.registry)
                await _respond(
                    send, 200, metrics, [(b"content-type", CONTENT_TYPE_LATEST.encode())]
                )
            else:
                raise _HttpError(404, f"no such endpoint: {path}")
        except _HttpError as exc:
            await _respond(send, exc.status, _encode({"error": str(exc)}), _JSON)

    def _score_tokens(self, body: bytes) -> dict[str, Any]:
        try:
            request = _decode_score(body)
        except msgspec.ValidationError as exc:
            raise _HttpError(400, f"invalid request: {exc}") from None
        except msgspec.DecodeError as exc:
            raise _HttpError(400, f"body is not valid JSON: {exc}") from None
        try:
            scores = self.indexer.score_tokens(
                request.token_ids, request.model, request.pods, lora=request.lora
            )
        except KVCacheError as exc:
            raise _HttpError(400, str(exc)) from None
        return {"scores": scores}

    async def _body(self, scope: Scope, receive: Receive) -> bytes:
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body_bytes:
                raise _HttpError(413, f"body larger than {self.max_body_bytes} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _HttpError(413, f"body larger than {self.max_body_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise _HttpError(405, f"method {method} not allowed here; use {allowed}")


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
