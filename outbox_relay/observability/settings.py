"""Logging, metrics and health-probe settings shared by ``serve`` and ``consume``."""

from __future__ import annotations

import enum
import ipaddress
import re
from typing import Annotated

from pydantic import AfterValidator, Field, model_validator

from outbox_relay.observability.metrics import metrics_exporter_names
from outbox_relay.settings import Flag, Port, Settings, env_name, option_name


class LogLevel(enum.StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class LogFormat(enum.StrEnum):
    TEXT = "text"
    JSON = "json"


_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


def check_host(host: str) -> str:
    """An address to listen on: an IP address or a host name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.fullmatch(host):
            raise ValueError(
                f"{host!r} is not an address to listen on (e.g. 127.0.0.1, 0.0.0.0 or ::)"
            ) from None
    return host


# Loopback unless told otherwise: probes and scrapes from another host (Kubernetes, Prometheus)
# need --metrics-host / --health-host 0.0.0.0, which the deploy manifests set.
DEFAULT_LISTEN_HOST = "127.0.0.1"

ListenHost = Annotated[
    str, AfterValidator(check_host), Flag(metavar="ADDRESS", panel="Observability")
]


class ObservabilitySettings(Settings):
    log_level: Annotated[
        LogLevel, Field(description="debug, info, warning or error."), Flag(panel="Observability")
    ] = LogLevel.INFO
    log_format: Annotated[
        LogFormat,
        Field(description="text or json (one object a line)."),
        Flag(panel="Observability"),
    ] = LogFormat.TEXT
    metrics_port: Annotated[
        Port | None,
        Field(description="Serve Prometheus metrics on http://HOST:PORT/metrics."),
        Flag(panel="Observability"),
    ] = None
    metrics_host: Annotated[
        ListenHost,
        Field(description="Address the metrics endpoint listens on (with --metrics-port)."),
    ] = DEFAULT_LISTEN_HOST
    health_port: Annotated[
        Port | None,
        Field(description="Serve /livez and /readyz (Kubernetes probes) on this port."),
        Flag(panel="Observability"),
    ] = None
    health_host: Annotated[
        ListenHost,
        Field(description="Address the health endpoint listens on (with --health-port)."),
    ] = DEFAULT_LISTEN_HOST

    @model_validator(mode="after")
    def _hosts_need_their_ports(self) -> ObservabilitySettings:
        # An address without a port serves nothing: a mistake worth one line, not silence.
        # (The deploy manifests set both.) Except --metrics-host with OTEL_METRICS_EXPORTER=
        # prometheus: that exporter's endpoint (OTEL_EXPORTER_PROMETHEUS_PORT) listens on it.
        given = self.model_fields_set
        prometheus = "prometheus" in metrics_exporter_names()
        if "metrics_host" in given and self.metrics_port is None and not prometheus:
            raise ValueError(host_without_port("metrics_host", "metrics_port"))
        if "health_host" in given and self.health_port is None:
            raise ValueError(host_without_port("health_host", "health_port"))
        return self


def host_without_port(host: str, port: str) -> str:
    """The one line for a listen address given without its port, naming both options."""
    host_flag, port_flag = option_name(host), option_name(port)
    return (
        f"{host_flag} ({env_name(host)}) applies only with {port_flag} ({env_name(port)}): "
        f"nothing listens without a port; set {port_flag} too, or drop {host_flag}"
    )
