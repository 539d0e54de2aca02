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
not instrumented, records carry no trace headers, and the SDK is not even imported
(the spans live in worker/spans.py).

Propagation is the SDK's (`opentelemetry.propagate`, `OTEL_PROPAGATORS`, W3C trace
context by default). The aiokafka instrumentation is not used: it adds a new
`traceparent` to every message at each send, so a relayed result would differ from the
first (G2), and it names the send, not the span that produced the result.
"""

from __future__ import annotations

import os
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the SDK is imported only when tracing is turned on
    from opentelemetry.trace import TracerProvider

    from worker.spans import Tracing

SERVICE = "cart-release-worker"
_active: Tracing | None = None


def active() -> Tracing | None:
    """The tracing of this process, or None when it is off."""
    return _active


def enable(provider: TracerProvider) -> Tracing:
    """Trace batches with `provider`, and PostgreSQL statements inside them."""
    from worker import spans

    global _active
    spans.instrument_asyncpg(provider)
    _active = spans.Tracing(provider)
    return _active


def disable() -> None:
    global _active
    if _active is not None:
        from worker import spans

        spans.uninstrument_asyncpg()
    _active = None


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
    from opentelemetry import trace
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

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
    provider = SdkTracerProvider(resource=resource)  # the sampler: OTEL_TRACES_SAMPLER
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return enable(provider)


def shutdown() -> None:
    """Flush and stop the exporters (at exit)."""
    if _active is None:
        return
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider

    provider = trace.get_tracer_provider()
    if isinstance(provider, SdkTracerProvider):
        provider.shutdown()
