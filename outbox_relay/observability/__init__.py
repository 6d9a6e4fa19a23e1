"""Tracing, metrics, health probes and log formatting; wired into the relay and the consumer
through their hooks, so neither imports OpenTelemetry."""
