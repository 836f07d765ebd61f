"""OpenTelemetry tracing, optional (``pip install 'kvcache[otel]'``).

Spans and attributes carry upstream's names, so dashboards built for llm-d-kv-cache work as is:
``llm_d.kv_cache.score_tokens`` and ``llm_d.kv_cache.scorer.compute`` from the `Indexer`,
``llm_d.kv_cache.index`` (lookup), ``llm_d.kv_cache.index.add`` and ``llm_d.kv_cache.index.evict``
from `kvcache.index.instrumented.TracedIndex`.

Disabled (the default), nothing here runs and OpenTelemetry is never imported: the scoring path
pays one ``is None`` check. The SDK still reads its own ``OTEL_*`` variables (headers, resource
attributes, propagators: W3C tracecontext and baggage by default); the values below come from
the config tree and win over the SDK's variables for the same setting.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Literal

import msgspec

from kvcache.errors import ConfigError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Tracer

SCOPE = "kvcache"
"""Instrumentation scope of the scoring spans (upstream: ``…/pkg/kvcache``)."""
INDEX_SCOPE = "kvcache.index"
"""Instrumentation scope of the index spans (upstream: ``…/pkg/kvcache/kvblock``)."""

_MISSING = "tracing needs OpenTelemetry: pip install 'kvcache[otel]' ({})"


class TracingConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """OpenTelemetry tracing of scoring and index operations (defaults are upstream's)."""

    enabled: bool = False
    """Emit spans (needs the `otel` extra). Off: no OpenTelemetry code runs at all."""
    service_name: str = "llm-d-kv-cache"
    """`service.name` of the spans' resource (upstream's OTEL_SERVICE_NAME default)."""
    endpoint: str = "localhost:4317"
    """OTLP/gRPC collector, `host:port`. Plain text unless given as `https://host:port`."""
    exporter: Literal["otlp", "console"] = "otlp"
    """Where spans go: an OTLP/gRPC collector, or standard output (debugging)."""
    sample_ratio: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.1
    """Share of root traces sampled; a span with a parent follows the parent's decision."""


def _missing(exc: ImportError) -> ConfigError:
    return ConfigError("tracing.enabled", _MISSING.format(exc))


def tracer(scope: str = SCOPE) -> Tracer:
    """A tracer from the global provider (the one `init_tracing` installed, or the host's).

    Raises ConfigError when OpenTelemetry is not installed.
    """
    from kvcache import __version__  # here: config.py imports this module during kvcache's init

    try:
        from opentelemetry import trace
    except ImportError as exc:
        raise _missing(exc) from None
    return trace.get_tracer(scope, __version__)


def tracer_provider(config: TracingConfig) -> TracerProvider:
    """The SDK provider ``config`` describes: resource, parent-based ratio sampler, batched
    exporter. Not installed globally (`init_tracing` does that)."""
    from kvcache import __version__

    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SpanExporter,
        )
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError as exc:
        raise _missing(exc) from None
    exporter: SpanExporter
    if config.exporter == "console":
        exporter = ConsoleSpanExporter()
    else:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise _missing(exc) from None
        scheme, _, rest = config.endpoint.rpartition("://")
        exporter = OTLPSpanExporter(endpoint=rest, insecure=scheme.lower() != "https")
    provider = TracerProvider(
        resource=Resource.create(
            {"service.name": config.service_name, "service.version": __version__}
        ),
        sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


TRACE_HEADERS = ("traceparent", "tracestate", "baggage")
"""The W3C headers (HTTP) or metadata keys (gRPC) that carry a caller's trace context."""


@contextmanager
def remote_parent(carrier: Mapping[str, str]) -> Iterator[None]:
    """Spans started inside become children of the caller's span, whose W3C trace context
    (``traceparent``, ``tracestate``, ``baggage``; lower-case keys) ``carrier`` holds, through
    the global propagator. Without a ``traceparent`` nothing happens and nothing is imported,
    so a caller may enter it for every request; call it only with tracing on."""
    if "traceparent" not in carrier:
        yield
        return
    from opentelemetry import context, propagate

    token = context.attach(propagate.extract(carrier))
    try:
        yield
    finally:
        context.detach(token)


def _nothing() -> None:
    """The shutdown of tracing that was never started."""


def init_tracing(config: TracingConfig) -> Callable[[], None]:
    """Install the configured provider globally (stand-alone service); returns its shutdown,
    which flushes queued spans. Disabled: installs nothing and imports nothing.

    Raises ConfigError when enabled without the ``otel`` extra installed.
    """
    if not config.enabled:
        return _nothing
    provider = tracer_provider(config)
    from opentelemetry import trace

    trace.set_tracer_provider(provider)
    return provider.shutdown
