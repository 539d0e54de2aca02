"""Optional OpenTelemetry tracing: off unless the standard `OTEL_*` variables ask for it.

What a trace shows (docs/operations.md: Tracing):
- one `<input topic> process` span per batch (kind CONSUMER), linked to the context of
  each of its records that carries a W3C `traceparent`;
- one `release record` span per record, a child of the record's own context (so the
  checkout's trace goes on), or of the batch span when the record carries none;
- the record span's `traceparent` on each result of that record. It is rendered with
  the result and stored with it in the outbox (and the inbox): a relayed or replayed
  result is the stored bytes again (G2), so it names the span that first produced it;
- the PostgreSQL statements of the batch as children of the batch span (the asyncpg
  instrumentation). Statements of background passes (relay, sweeper, health pings) are
  not traced: they would be a root span every second per worker.

Off (the default), none of this runs: the processor checks once per batch, asyncpg is
not instrumented, and records carry no trace headers.

Propagation is the SDK's (`opentelemetry.propagate`, `OTEL_PROPAGATORS`, W3C trace
context by default). The aiokafka instrumentation is not used: it adds a new
`traceparent` to every message at each send, so a relayed result would differ from the
first (G2), and it names the send, not the span that produced the result.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from importlib.metadata import entry_points
from typing import Any, TypeVar

from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Link, SpanKind
from opentelemetry.util.types import AttributeValue

from worker.records import Headers, RawRecord

SERVICE = "cart-release-worker"
T = TypeVar("T")


class _HeaderGetter(Getter[Headers]):
    def get(self, carrier: Headers, key: str) -> list[str] | None:
        found = [v.decode(errors="replace") for k, v in carrier if k.lower() == key and v]
        return found or None

    def keys(self, carrier: Headers) -> list[str]:
        return [k for k, _ in carrier]


class _HeaderSetter(Setter[list[tuple[str, bytes | None]]]):
    def set(self, carrier: list[tuple[str, bytes | None]], key: str, value: str) -> None:
        carrier.append((key, value.encode()))


_GETTER, _SETTER = _HeaderGetter(), _HeaderSetter()


class Tracing:
    """Spans of the worker's batches and records, from one tracer provider."""

    def __init__(self, provider: trace.TracerProvider) -> None:
        self._tracer = provider.get_tracer("worker", schema_url=None)

    async def batch(
        self,
        topic: str,
        records: Sequence[RawRecord],
        process: Callable[[Sequence[RawRecord]], Awaitable[T]],
    ) -> T:
        """Run `process` on the records inside the batch span, each record carrying the
        `traceparent` of its own span (`RawRecord.trace_headers`), which its results get."""
        contexts = [propagate.extract(r.headers, getter=_GETTER) for r in records]
        parents = [trace.get_current_span(c).get_span_context() for c in contexts]
        links = [Link(p) for p in parents if p.is_valid]
        attributes: dict[str, AttributeValue] = {
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.destination.name": topic,
            "messaging.batch.message_count": len(records),
        }
        with self._tracer.start_as_current_span(
            f"{topic} process", kind=SpanKind.CONSUMER, links=links, attributes=attributes
        ):
            spans = [
                self._tracer.start_span(
                    "release record",
                    context=context if parent.is_valid else None,
                    attributes={
                        "messaging.destination.name": r.topic,
                        "messaging.destination.partition.id": str(r.partition),
                        "messaging.kafka.offset": r.offset,
                    },
                )
                for r, context, parent in zip(records, contexts, parents, strict=True)
            ]
            try:
                traced = [
                    replace(r, trace_headers=_traceparent(span))
                    for r, span in zip(records, spans, strict=True)
                ]
                return await process(traced)
            finally:
                for span in spans:
                    span.end()


def _traceparent(span: trace.Span) -> Headers:
    carrier: list[tuple[str, bytes | None]] = []
    propagate.inject(carrier, context=trace.set_span_in_context(span), setter=_SETTER)
    return tuple(carrier)


class _ChildSpansOnly(trace.TracerProvider):
    """Tracers that record a span only inside another one: the asyncpg instrumentation
    starts a span for every statement, also those of background passes."""

    def __init__(self, provider: trace.TracerProvider) -> None:
        self._provider = provider

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return _ChildTracer(self._provider.get_tracer(*args, **kwargs))


class _ChildTracer(trace.Tracer):
    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    def start_span(self, name: str, context: Any = None, *args: Any, **kwargs: Any) -> trace.Span:
        parent = trace.get_current_span(context).get_span_context()
        if not parent.is_valid:
            return trace.INVALID_SPAN
        return self._tracer.start_span(name, context, *args, **kwargs)

    @contextmanager
    def start_as_current_span(  # type: ignore[override]
        self, name: str, *args: Any, **kwargs: Any
    ) -> Iterator[trace.Span]:
        context = kwargs.get("context", args[0] if args else None)
        if not trace.get_current_span(context).get_span_context().is_valid:
            yield trace.INVALID_SPAN
            return
        with self._tracer.start_as_current_span(name, *args, **kwargs) as span:
            yield span


_active: Tracing | None = None


def active() -> Tracing | None:
    """The tracing of this process, or None when it is off."""
    return _active


def enable(provider: trace.TracerProvider) -> Tracing:
    """Trace batches with `provider`, and PostgreSQL statements inside them."""
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

    global _active
    instrumentor = AsyncPGInstrumentor()  # type: ignore[no-untyped-call]
    if instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.uninstrument()
    instrumentor.instrument(tracer_provider=_ChildSpansOnly(provider))
    _active = Tracing(provider)
    return _active


def disable() -> None:
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

    global _active
    _active = None
    instrumentor = AsyncPGInstrumentor()  # type: ignore[no-untyped-call]
    if instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.uninstrument()


def wanted(environ: dict[str, str] | os._Environ[str] = os.environ) -> list[str]:
    """The span exporters the `OTEL_*` variables ask for; none means tracing is off.

    `OTEL_SDK_DISABLED=true` turns it off; else `OTEL_TRACES_EXPORTER` names them
    (`none` = off), and an OTLP endpoint (`OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`) alone
    means `otlp`, the SDK's default exporter."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if not names and any(
        environ.get(v)
        for v in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    ):
        names = ["otlp"]
    return [] if names == ["none"] else names


def configure_from_environment() -> Tracing | None:
    """Enable tracing as the `OTEL_*` variables say (exporters, sampler, resource,
    propagators are all the SDK's own reading of them); None when they leave it off."""
    names = wanted()
    if not names:
        return None
    exporters: list[SpanExporter] = []
    for name in names:
        found = entry_points(group="opentelemetry_traces_exporter", name=name)
        if not found:
            raise SystemExit(
                f"OTEL_TRACES_EXPORTER names {name!r}, which is not installed "
                "(for `otlp`: pip install opentelemetry-exporter-otlp-proto-http==1.45.1)"
            )
        exporters.append(next(iter(found)).load()())
    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win over this default name.
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: SERVICE}))
    provider = TracerProvider(resource=resource)  # the sampler: OTEL_TRACES_SAMPLER
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return enable(provider)


def shutdown() -> None:
    """Flush and stop the exporters (at exit)."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.shutdown()
