"""Where the tests find PostgreSQL and RabbitMQ.

Order: environment variables, then the local defaults, then testcontainers when a Docker engine
is available. When none works the run fails loudly: integration tests are never skipped.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_RABBITMQ = "amqp://guest:guest@127.0.0.1:5672/%2F"


@dataclass(frozen=True)
class Services:
    postgres_admin_url: str  # a maintenance database; tests create their own databases
    rabbitmq_url: str


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), 2
        ):
            return True
    except OSError:
        return False


def _docker_available() -> bool:
    try:
        import docker  # type: ignore[import-untyped]  # testcontainers' dependency

        docker.from_env().ping()
        return True
    except Exception:
        return False


@contextmanager
def provide_services() -> Iterator[Services]:
    postgres = os.environ.get("OUTBOX_RELAY_TEST_DATABASE_URL", DEFAULT_POSTGRES)
    rabbitmq = os.environ.get("OUTBOX_RELAY_TEST_BROKER_URL", DEFAULT_RABBITMQ)
    with ExitStack() as stack:
        missing = [
            name
            for name, url, port in (("PostgreSQL", postgres, 5432), ("RabbitMQ", rabbitmq, 5672))
            if not _reachable(url, port)
        ]
        if missing and _docker_available():
            from testcontainers.postgres import PostgresContainer  # type: ignore[import-untyped]  # no type hints
            from testcontainers.rabbitmq import RabbitMqContainer  # type: ignore[import-untyped]  # no type hints

            if "PostgreSQL" in missing:
                pg = stack.enter_context(
                    PostgresContainer("postgres:15", driver=None).with_command(
                        "postgres -c wal_level=logical"
                    )
                )
                postgres = pg.get_connection_url()
            if "RabbitMQ" in missing:
                # The ordered consumer's partition exchange needs this plugin.
                rmq = stack.enter_context(
                    RabbitMqContainer("rabbitmq:3.13").with_command(
                        "sh -c 'rabbitmq-plugins enable --offline "
                        "rabbitmq_consistent_hash_exchange && exec docker-entrypoint.sh "
                        "rabbitmq-server'"
                    )
                )
                host, port = rmq.get_container_host_ip(), rmq.get_exposed_port(5672)
                rabbitmq = f"amqp://guest:guest@{host}:{port}/%2F"
            missing = []
        if missing:
            raise RuntimeError(
                f"{' and '.join(missing)} not reachable and no Docker engine for testcontainers: "
                "start the services (see README) or set OUTBOX_RELAY_TEST_DATABASE_URL / "
                "OUTBOX_RELAY_TEST_BROKER_URL"
            )
        yield Services(postgres_admin_url=postgres, rabbitmq_url=rabbitmq)
