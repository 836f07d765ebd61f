"""The OpenAPI 3.1 description of the HTTP API: schemas from the msgspec structs, paths by hand.

Served at GET /openapi.json and checked in as docs/openapi.json (a test keeps the two equal).
Regenerate with ``python -m kvcache.service.openapi > docs/openapi.json``.
"""

from __future__ import annotations

import sys
from typing import Any

import msgspec

from kvcache import __version__
from kvcache.service.http_models import (
    REQUEST_BODIES,
    ClearResponse,
    ErrorResponse,
    PodInfo,
    PodList,
    ScoreResponse,
    StatusResponse,
)

_REF = "#/components/schemas/{name}"


def _ref(struct: type[msgspec.Struct]) -> dict[str, Any]:
    return {"$ref": _REF.format(name=struct.__name__)}


def _json(struct: type[msgspec.Struct], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(struct)}}}


def _errors(*statuses: int) -> dict[str, Any]:
    meaning = {
        400: "Invalid input: malformed JSON, a wrong or missing field, a token id outside "
        "0..2^32-1, too many tokens or pods.",
        401: "Missing or wrong bearer token (only when the server is started with a token).",
        404: "Unknown model (no tokenizer for it) or unknown pod.",
        413: "Body larger than the configured limit.",
        501: "Not available in this server (tokenizer libraries or pod introspection missing).",
        503: "The tokenizer pool is overloaded; retry later.",
        504: "Tokenization did not finish within its deadline.",
    }
    return {str(status): _json(ErrorResponse, meaning[status]) for status in statuses}


_SCORING = {
    "/score_tokens": (
        "Score pods for token ids",
        "The token ids as the engine sees them (no tokenization).",
        (400, 401, 413),
    ),
    "/score_completions": (
        "Score pods for a completion prompt (Go example shape)",
        "The prompt is tokenized with the model's tokenizer as vLLM does. 400 if it is empty.",
        (400, 401, 404, 413, 501, 503, 504),
    ),
    "/score_chat_completions": (
        "Score pods for a chat (Go example shape)",
        "The conversation is rendered with the model's chat template and tokenized as vLLM does.",
        (400, 401, 404, 413, 501, 503, 504),
    ),
    "/v1/completions": (
        "Score pods for an OpenAI /v1/completions body",
        "Any OpenAI completions body; fields that do not change the tokens are ignored. A list "
        "of prompts scores the first.",
        (400, 401, 404, 413, 501, 503, 504),
    ),
    "/v1/chat/completions": (
        "Score pods for an OpenAI /v1/chat/completions body",
        "Any OpenAI chat completions body; fields that do not change the tokens are ignored.",
        (400, 401, 404, 413, 501, 503, 504),
    ),
}

_POD_PARAMETER = {
    "name": "pod",
    "in": "path",
    "required": True,
    "description": "The pod id, percent-encoded (e.g. 10.0.0.7%3A8000).",
    "schema": {"type": "string"},
}


def _paths() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for path, (summary, description, errors) in _SCORING.items():
        paths[path] = {
            "post": {
                "summary": summary,
                "description": description,
                "operationId": path.strip("/").replace("/", "_"),
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref(REQUEST_BODIES[path])}},
                },
                "responses": {"200": _json(ScoreResponse, "Pod scores."), **_errors(*errors)},
            }
        }
    probe: dict[str, Any] = {"security": []}  # open even when a token is configured
    paths["/healthz"] = {
        "get": {
            **probe,
            "summary": "Liveness: the event subscriber is running",
            "operationId": "healthz",
            "responses": {
                "200": _json(StatusResponse, "Healthy."),
                "503": _json(StatusResponse, "Unhealthy."),
            },
        }
    }
    paths["/readyz"] = {
        "get": {
            **probe,
            "summary": "Readiness: subscribers are up and a shared index answers",
            "operationId": "readyz",
            "responses": {
                "200": _json(StatusResponse, "Ready."),
                "503": _json(StatusResponse, "Not ready."),
            },
        }
    }
    paths["/metrics"] = {
        "get": {
            **probe,
            "summary": "Prometheus metrics",
            "operationId": "metrics",
            "responses": {
                "200": {
                    "description": "Prometheus text exposition format.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        }
    }
    paths["/openapi.json"] = {
        "get": {
            "summary": "This document",
            "operationId": "openapi",
            "responses": {
                "200": {
                    "description": "The OpenAPI 3.1 description of the API.",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                **_errors(401),
            },
        }
    }
    paths["/pods"] = {
        "get": {
            "summary": "Every pod known to ingest, with its state",
            "operationId": "list_pods",
            "responses": {"200": _json(PodList, "The pods, by id."), **_errors(401, 501)},
        }
    }
    paths["/pods/{pod}"] = {
        "parameters": [_POD_PARAMETER],
        "get": {
            "summary": "One pod's state",
            "operationId": "get_pod",
            "responses": {"200": _json(PodInfo, "The pod."), **_errors(401, 404, 501)},
        },
        "delete": {
            "summary": "Forget a pod and remove its blocks from the index",
            "operationId": "clear_pod",
            "responses": {
                "200": _json(ClearResponse, "What was removed."),
                **_errors(401, 404, 501),
            },
        },
    }
    return paths


def build_spec() -> dict[str, Any]:
    """The OpenAPI document as plain data."""
    structs = [
        *REQUEST_BODIES.values(),
        ScoreResponse,
        ErrorResponse,
        StatusResponse,
        PodList,
        PodInfo,
        ClearResponse,
    ]
    _, schemas = msgspec.json.schema_components(structs, ref_template=_REF)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "kvcache",
            "version": __version__,
            "description": "KV-cache-aware routing: score pods by the longest prefix of a "
            "request's blocks they cache. Errors are JSON objects with an 'error' message; a "
            "wrong method on a known path answers 405 with an Allow header.",
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "Only enforced when the server is started with a token.",
                }
            },
        },
        "security": [{"bearer": []}],
        "paths": _paths(),
    }


def render_spec() -> str:
    """The document as indented JSON with a trailing newline (the checked-in form)."""
    text: str = msgspec.json.format(msgspec.json.encode(build_spec()), indent=2).decode()
    return text + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_spec())
