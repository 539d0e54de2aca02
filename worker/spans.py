"""The OpenTelemetry side of `worker/tracing.py`, imported only when tracing is on (the
SDK costs ~0.2 s and several MiB to import): the batch and record spans, the header
carriers for the SDK's propagators, and asyncpg statements as child spans only."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, TypeVar

from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.trace import Link, SpanKind
from opentelemetry.util.types import AttributeValue

from worker.records import Headers, RawRecord

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


def instrument_asyncpg(provider: trace.TracerProvider) -> None:
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

    instrumentor = AsyncPGInstrumentor()  # type: ignore[no-untyped-call]
    if instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.uninstrument()
    instrumentor.instrument(tracer_provider=_ChildSpansOnly(provider))


def uninstrument_asyncpg() -> None:
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

    instrumentor = AsyncPGInstrumentor()  # type: ignore[no-untyped-call]
    if instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.uninstrument()
