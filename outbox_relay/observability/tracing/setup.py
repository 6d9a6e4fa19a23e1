"""The tracer provider and its exporters, configured from the standard ``OTEL_*`` variables."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

from opentelemetry import trace

from outbox_relay.errors import ConfigError, MissingExtraError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def traces_exporter_names() -> list[str]:
    """OTEL_TRACES_EXPORTER as a list. Unlike the SDK's default (otlp), nothing configured means
    no exporter, unless an OTLP endpoint is given: a relay must not try to reach a collector
    nobody runs."""
    value = _env("OTEL_TRACES_EXPORTER").lower()
    if not value:
        endpoint = _env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or _env("OTEL_EXPORTER_OTLP_ENDPOINT")
        return ["otlp"] if endpoint else []
    names = [n.strip() for n in value.split(",") if n.strip()]
    return [] if "none" in names else names


def otlp_protocol(signal: str) -> str:
    protocol = (
        _env(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL")
        or _env("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).lower()
    if protocol not in {"grpc", "http/protobuf"}:
        raise ConfigError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not one of grpc, http/protobuf"
        )
    return protocol


def configure_tracing(
    default_service_name: str, *, set_global: bool = True
) -> TracerProvider | None:
    """Build the tracer provider the ``OTEL_*`` variables ask for, or None when they ask for none.

    Honours OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES (resource), OTEL_TRACES_SAMPLER[_ARG]
    (sampler), OTEL_TRACES_EXPORTER (otlp, console, none; comma-separated), and for OTLP the
    exporters' own OTEL_EXPORTER_OTLP_* variables with the protocol grpc or http/protobuf.
    Console spans go to stderr so a command's stdout stays machine-readable.
    """
    names = traces_exporter_names()
    if not names:
        return None
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ModuleNotFoundError as exc:
        raise MissingExtraError(
            f"OTEL_TRACES_EXPORTER={','.join(names)} needs the OpenTelemetry SDK: "
            "pip install 'outbox-relay[otel]'"
        ) from exc
    attributes = {} if _env("OTEL_SERVICE_NAME") else {SERVICE_NAME: default_service_name}
    provider = TracerProvider(resource=Resource.create(attributes))
    for name in names:
        if name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
        elif name == "otlp":
            provider.add_span_processor(BatchSpanProcessor(_otlp_span_exporter()))
        else:
            raise ConfigError(f"OTEL_TRACES_EXPORTER: {name!r} is not one of otlp, console, none")
    if set_global:
        trace.set_tracer_provider(provider)
    return provider


def _otlp_span_exporter() -> Any:
    try:
        if otlp_protocol("traces") == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            # The gRPC and HTTP exporters are distinct classes with one interface; either is the exporter.
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
                OTLPSpanExporter,
            )
    except ModuleNotFoundError as exc:
        raise MissingExtraError(
            "OTEL_TRACES_EXPORTER=otlp needs the OTLP exporter: pip install 'outbox-relay[otel]'"
        ) from exc
    return OTLPSpanExporter()
