"""The gRPC API: llm-d's ``indexer.v1.IndexerService`` plus kvcache's token and chat RPCs.

``GetPodScores`` is upstream's contract, byte for byte on the wire; ``ScoreTokens`` and
``ScoreChat`` are additions in the same service (``proto/indexer.proto``). Requests are parsed
here rather than by grpc so that a malformed message is INVALID_ARGUMENT, like every other bad
input; only a bug in kvcache is INTERNAL, and its traceback stays in the server log.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Collection, Sequence
from concurrent import futures
from typing import Any, TypeVar

import grpc
import msgspec
import numpy as np
from google.protobuf.message import DecodeError, Message

from kvcache.errors import ConfigError, KVCacheError
from kvcache.indexer import Indexer, ScoreDetail
from kvcache.scoring import normalize_scores
from kvcache.service.proto import indexer_pb2 as pb
from kvcache.service.proto import indexer_pb2_grpc as pb_grpc
from kvcache.tokenization.chat import ChatRequest
from kvcache.tokenization.errors import (
    MissingDependencyError,
    PoolOverloadedError,
    TokenizationTimeoutError,
)
from kvcache.tracing import TRACE_HEADERS, remote_parent

log = logging.getLogger("kvcache.grpc")

SERVICE = "indexer.v1.IndexerService"

_Request = TypeVar("_Request", bound=Message)
_Response = TypeVar("_Response", bound=Message)
_T = TypeVar("_T")
_In = TypeVar("_In")
_Out = TypeVar("_Out")


class _InvalidArgumentError(ValueError):
    """The request breaks a rule of the API (a missing field, a list too long, bad JSON)."""


def _status(exc: KVCacheError) -> grpc.StatusCode:
    """The status a kvcache error maps to: the caller's input unless it names the server."""
    if isinstance(exc, MissingDependencyError | ConfigError):
        return grpc.StatusCode.FAILED_PRECONDITION  # the server is not set up for this request
    if isinstance(exc, PoolOverloadedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, TokenizationTimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    # Unknown model, bad token ids, template errors, unsupported content: the request's fault.
    return grpc.StatusCode.INVALID_ARGUMENT


def _answer(
    context: grpc.ServicerContext,
    method: str,
    work: Callable[[_Request], _Response],
    request: _Request,
    traced: bool = False,
) -> _Response:
    """Run ``work`` and turn every failure into a status with a one-line message."""
    try:
        if not traced:
            return work(request)
        # The caller's trace context, if its metadata carries one, parents the score spans.
        metadata = context.invocation_metadata() or ()
        carrier = {
            key.lower(): value
            for key, value in metadata
            if key.lower() in TRACE_HEADERS and isinstance(value, str)
        }
        with remote_parent(carrier):
            return work(request)
    except _InvalidArgumentError as exc:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except KVCacheError as exc:
        context.abort(_status(exc), str(exc))
    except Exception:
        log.exception("gRPC %s failed", method)
        context.abort(grpc.StatusCode.INTERNAL, f"{method}: internal error (see the server log)")


class IndexerServicer(pb_grpc.IndexerServiceServicer):
    """The RPCs over an `Indexer`; usable with ``add_IndexerServiceServicer_to_server`` too."""

    def __init__(
        self,
        indexer: Indexer,
        *,
        max_token_ids: int = 1 << 22,
        max_pods: int = 65_536,
        max_messages: int = 100_000,
    ) -> None:
        self.indexer = indexer
        self.max_token_ids = max_token_ids
        self.max_pods = max_pods
        self.max_messages = max_messages

    @property
    def _traced(self) -> bool:
        return self.indexer.tracer is not None

    # -- RPCs -------------------------------------------------------------------------------------

    def GetPodScores(  # noqa: N802 (the proto's RPC name)
        self, request: pb.GetPodScoresRequest, context: grpc.ServicerContext
    ) -> pb.GetPodScoresResponse:
        """Upstream's RPC: raw scores of the pods holding the prompt's first block."""
        return _answer(context, "GetPodScores", self._get_pod_scores, request, self._traced)

    def ScoreTokens(  # noqa: N802 (the proto's RPC name)
        self, request: pb.ScoreTokensRequest, context: grpc.ServicerContext
    ) -> pb.ScoreResponse:
        """Scores, normalised scores and matched blocks for token ids."""
        return _answer(context, "ScoreTokens", self._score_tokens, request, self._traced)

    def ScoreChat(  # noqa: N802 (the proto's RPC name)
        self, request: pb.ScoreChatRequest, context: grpc.ServicerContext
    ) -> pb.ScoreResponse:
        """Scores, normalised scores and matched blocks for a chat rendered as vLLM does."""
        return _answer(context, "ScoreChat", self._score_chat, request, self._traced)

    # -- implementations --------------------------------------------------------------------------

    def _get_pod_scores(self, request: pb.GetPodScoresRequest) -> pb.GetPodScoresResponse:
        model = _required(request.model_name, "model_name")
        if not request.prompt:
            raise _InvalidArgumentError("prompt is empty")
        scores = self.indexer.score(request.prompt, model, self._pods(request.pod_identifiers))
        return pb.GetPodScoresResponse(
            scores=[pb.PodScore(pod=pod, score=score) for pod, score in scores.items()]
        )

    def _score_tokens(self, request: pb.ScoreTokensRequest) -> pb.ScoreResponse:
        count = len(request.token_ids)
        if count > self.max_token_ids:
            raise _InvalidArgumentError(f"token_ids: {count} ids, more than {self.max_token_ids}")
        pods = self._pods(request.pod_identifiers)
        lora, extras = None, None
        if request.lora_name:
            # vLLM >= 0.31 hashes the adapter's path too: it comes from the adapter config.
            lora, extras = self.indexer.text.extras(request.model_name, lora=request.lora_name)
        # uint32 on the wire already bounds every id to [0, 2**32). As an array, not a list:
        # the repeated field hands its values over in one copy (8k ids: ~4 us, a list ~180 us),
        # and the key chain reads the array as it is.
        token_ids = np.array(request.token_ids, dtype=np.uint32)
        detail = self.indexer.score_tokens_detailed(
            token_ids, request.model_name, pods, lora=lora, extra=extras
        )
        return _score_response(detail, pods, count)

    def _score_chat(self, request: pb.ScoreChatRequest) -> pb.ScoreResponse:
        model = _required(request.model_name, "model_name")
        pods = self._pods(request.pod_identifiers)
        if not request.messages:
            raise _InvalidArgumentError("messages is empty")
        if len(request.messages) > self.max_messages:
            raise _InvalidArgumentError(
                f"messages: {len(request.messages)} messages, more than {self.max_messages}"
            )
        messages = []
        for position, message in enumerate(request.messages):
            role = _required(message.role, f"messages[{position}].role")
            messages.append({"role": role, "content": message.content})
        chat = ChatRequest(
            messages=messages,
            tools=_json(request.tools_json, "tools_json", list[dict[str, Any]]),
            chat_template=(request.chat_template if request.HasField("chat_template") else None),
            add_generation_prompt=(
                request.add_generation_prompt
                if request.HasField("add_generation_prompt")
                else True  # vLLM's default, which proto3's false cannot express
            ),
            continue_final_message=request.continue_final_message,
            chat_template_kwargs=_json(
                request.chat_template_kwargs_json, "chat_template_kwargs_json", dict[str, Any]
            ),
        )
        # The steps of Indexer.score_chat, kept apart to score with matched blocks.
        text = self.indexer.text
        ids = text.tokenize_chat(chat, model)
        lora, extras = text.extras(model)
        detail = self.indexer.score_tokens_detailed(
            ids, text.base_model(model), pods, lora=lora, extra=extras
        )
        return _score_response(detail, pods, len(ids))

    def _pods(self, identifiers: Sequence[str]) -> list[str] | None:
        if len(identifiers) > self.max_pods:
            raise _InvalidArgumentError(
                f"pod_identifiers: {len(identifiers)} pods, more than {self.max_pods}"
            )
        for position, pod in enumerate(identifiers):
            if not pod:
                raise _InvalidArgumentError(f"pod_identifiers[{position}] is empty")
        return list(identifiers) or None


def _required(value: str, field: str) -> str:
    if not value:
        raise _InvalidArgumentError(f"{field} is required")
    return value


def _json(value: str, field: str, kind: type[_T]) -> _T | None:
    """A JSON-in-a-string field: None when empty, else a value of ``kind``."""
    if not value:
        return None
    try:
        return msgspec.json.decode(value, type=kind)
    except msgspec.ValidationError as exc:
        raise _InvalidArgumentError(f"{field}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise _InvalidArgumentError(f"{field} is not valid JSON: {exc}") from None


def _score_response(
    detail: ScoreDetail, candidates: Collection[str] | None, token_count: int
) -> pb.ScoreResponse:
    """Scored pods (highest first), then candidates without a score, normalised as llm-d does."""
    normalized = normalize_scores(detail.scores)
    pods = [
        pb.PodMatch(
            pod=pod,
            score=score,
            normalized_score=normalized[pod],
            matched_blocks=detail.matched_blocks.get(pod, 0),
        )
        for pod, score in detail.scores.items()
    ]
    pods.extend(
        pb.PodMatch(pod=pod) for pod in sorted(set(candidates or ()) - detail.scores.keys())
    )
    return pb.ScoreResponse(pods=pods, request_blocks=detail.blocks, token_count=token_count)


class _BearerAuth(grpc.ServerInterceptor):
    """Refuses every call whose ``authorization`` metadata is not ``Bearer <token>``."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

        def deny(request: bytes, context: grpc.ServicerContext) -> bytes:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

        self._deny: grpc.RpcMethodHandler[Any, Any] = grpc.unary_unary_rpc_method_handler(deny)

    def _authorized(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        for key, value in metadata or ():
            if key != "authorization":
                continue
            raw = value if isinstance(value, bytes) else value.encode()
            scheme, _, credential = raw.partition(b" ")
            # Constant-time comparison: the time taken does not reveal how much of it matched.
            if scheme.lower() == b"bearer" and hmac.compare_digest(credential.strip(), self._token):
                return True
        return False

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[_In, _Out] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[_In, _Out] | None:
        """Continue to the RPC when authorised, else answer UNAUTHENTICATED."""
        metadata: Any = handler_call_details.invocation_metadata
        if self._authorized(metadata):
            return continuation(handler_call_details)
        deny: grpc.RpcMethodHandler[_In, _Out] = self._deny
        return deny


def _parsing(
    servicer_method: Callable[[_Request, grpc.ServicerContext], Message],
    request_type: type[_Request],
    name: str,
) -> grpc.RpcMethodHandler[bytes, bytes]:
    """A handler that parses the request itself: a malformed one is INVALID_ARGUMENT."""

    def handle(raw: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            request = request_type.FromString(raw)
        except DecodeError as exc:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{name}: malformed {request_type.__name__}: {exc}",
            )
        return servicer_method(request, context).SerializeToString()

    return grpc.unary_unary_rpc_method_handler(handle)


class GrpcServer:
    """``IndexerService`` on ``host:port`` over a thread pool (a Redis lookup may block one)."""

    def __init__(
        self,
        indexer: Indexer,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        max_workers: int = 8,
        max_message_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        if token is not None and not token:
            raise ConfigError("grpc.token", "must not be empty (leave it unset for no auth)")
        self.indexer = indexer
        self.servicer = IndexerServicer(indexer)
        self.host = host
        self.port = port
        self.token = token
        self.max_workers = max_workers
        self.max_message_bytes = max_message_bytes
        self._server: grpc.Server | None = None

    @property
    def address(self) -> str:
        """``host:port`` as grpc spells it (IPv6 literals in brackets)."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"

    def start(self) -> int:
        """Bind and serve in the background; returns the bound port (useful with port 0)."""
        if self._server is not None:
            raise RuntimeError("GrpcServer already started")
        s = self.servicer
        handlers = {
            "GetPodScores": _parsing(s.GetPodScores, pb.GetPodScoresRequest, "GetPodScores"),
            "ScoreTokens": _parsing(s.ScoreTokens, pb.ScoreTokensRequest, "ScoreTokens"),
            "ScoreChat": _parsing(s.ScoreChat, pb.ScoreChatRequest, "ScoreChat"),
        }
        server = grpc.server(
            futures.ThreadPoolExecutor(self.max_workers, thread_name_prefix="kvcache-grpc"),
            handlers=[grpc.method_handlers_generic_handler(SERVICE, handlers)],
            interceptors=[_BearerAuth(self.token)] if self.token is not None else None,
            options=[
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", self.max_message_bytes),
                # grpc sets SO_REUSEPORT by default: a second server would share a busy port.
                ("grpc.so_reuseport", 0),
            ],
        )
        address = self.address
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError as exc:
            server.stop(None)
            raise ConfigError("grpc.port", f"cannot listen on {address}: {exc}") from None
        if bound == 0:  # older grpcio reports a failed bind this way
            server.stop(None)
            raise ConfigError("grpc.port", f"cannot listen on {address}")
        server.start()
        self._server = server
        self.port = bound
        return bound

    def stop(self, grace: float | None = 5.0) -> None:
        """Refuse new calls, let running ones finish within ``grace`` seconds, then return."""
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace).wait()
