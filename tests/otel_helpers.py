"""A process-wide OpenTelemetry tracer provider for one test at a time."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once


def _set_global_provider(provider: TracerProvider | None) -> None:
    # The API lets a process set its provider once; tests take turns, as OpenTelemetry's own
    # test utilities do.
    trace._TRACER_PROVIDER_SET_ONCE = Once()  # type: ignore[attr-defined]  # private: reset between tests
    trace._TRACER_PROVIDER = None  # type: ignore[attr-defined]  # private, as above
    if provider is not None:
        trace.set_tracer_provider(provider)


@contextmanager
def global_memory_tracing() -> Iterator[InMemorySpanExporter]:
    """Install an SDK provider exporting to memory as the global one; remove it afterwards."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _set_global_provider(provider)
    try:
        yield exporter
    finally:
        _set_global_provider(None)
        provider.shutdown()
