"""OpenTelemetry tracing (issue 11), on the real servers with the SDK's in-memory exporter:
the input's trace goes on, the batch span links the records, results carry the span that
produced them (a replay repeats it byte for byte, G2), and SQL statements are child spans."""

from __future__ import annotations

from collections.abc import Iterator

import asyncpg
import pytest
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tests.integration.conftest import World, reserve
from tests.support import produce, read_results, running_worker
from worker import tracing
from worker.contract import ResultHeaders
from worker.testing.scenario import Event, abandon_event

pytestmark = pytest.mark.integration


@pytest.fixture
def exported() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider)
    try:
        yield provider, exporter
    finally:
        tracing.disable()
        provider.shutdown()


def _with_trace_of(event: Event, span: trace.Span) -> Event:
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return Event(
        event.key, event.value, (*event.headers, *((k, v.encode()) for k, v in carrier.items()))
    )


def _context_of(headers: dict[str, bytes]) -> trace.SpanContext:
    carrier = {k: v.decode() for k, v in headers.items()}
    return trace.get_current_span(propagate.extract(carrier)).get_span_context()


async def test_results_continue_the_inputs_trace_and_sql_statements_are_child_spans(
    db: asyncpg.Pool, world: World, exported: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = exported
    p = world.prefix
    await reserve(db, world, f"{p}-r1", f"{p}-c1", "i1", 2)
    await reserve(db, world, f"{p}-r2", f"{p}-c2", "i2", 1)
    with provider.get_tracer("checkout").start_as_current_span("checkout") as checkout:
        traced = _with_trace_of(
            abandon_event(f"{p}-c1", [("i1", f"{p}-r1")], world.api_key, event_id=f"{p}-e1"),
            checkout,
        )
    untraced = abandon_event(f"{p}-c2", [("i2", f"{p}-r2")], world.api_key, event_id=f"{p}-e2")
    async with running_worker(world.settings):
        await produce(world.settings, [traced, untraced])
        first = await read_results(world.settings, 2)
        await produce(world.settings, [traced])  # a replay: the stored result again
        records = await read_results(world.settings, 3)

    spans = exporter.get_finished_spans()
    by_id = {s.context.span_id: s for s in spans}
    e1 = [r for r in records if r.body["eventId"] == f"{p}-e1"]
    e2 = next(r for r in first if r.body["eventId"] == f"{p}-e2")
    # The record's span continues the checkout's trace; its result names that span.
    produced_by = _context_of(e1[0].headers)
    assert produced_by.trace_id == checkout.get_span_context().trace_id
    record_span = by_id[produced_by.span_id]
    assert record_span.name == "release record"
    assert record_span.parent is not None
    assert record_span.parent.span_id == checkout.get_span_context().span_id
    # The contract's result headers name it (tracing adds no header they refuse).
    ResultHeaders.model_validate({k: v.decode() for k, v in e1[0].headers.items()})
    # The replay is the first result byte for byte, traceparent included (G2).
    assert len(e1) == 2
    assert (e1[0].value, e1[0].headers) == (e1[1].value, e1[1].headers)
    # The batch span links each traced record's context.
    batches = [s for s in spans if s.name == f"{world.settings.input_topic} process"]
    assert batches
    assert all(s.kind is SpanKind.CONSUMER for s in batches)
    linked = {link.context.span_id for s in batches for link in s.links}
    assert checkout.get_span_context().span_id in linked
    # A record without a traceparent gets a span in its batch's trace.
    untraced_span = by_id[_context_of(e2.headers).span_id]
    assert untraced_span.parent is not None
    assert by_id[untraced_span.parent.span_id] in batches
    # The batch's PostgreSQL statements are its children; no statement is a root span.
    statements = [s for s in spans if s.kind is SpanKind.CLIENT]
    assert any(_parent(s, by_id) in batches for s in statements)
    assert all(s.parent is not None for s in statements)


def _parent(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> ReadableSpan | None:
    return by_id.get(span.parent.span_id) if span.parent is not None else None


def test_tracing_is_off_unless_the_otel_variables_ask_for_it() -> None:
    assert tracing.wanted({}) == []
    assert tracing.wanted({"OTEL_SERVICE_NAME": "x"}) == []
    assert tracing.wanted({"OTEL_TRACES_EXPORTER": "none"}) == []
    assert tracing.wanted({"OTEL_TRACES_EXPORTER": "console"}) == ["console"]
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) == ["otlp"]
    disabled = {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"}
    assert tracing.wanted(disabled) == []
    assert tracing.active() is None
