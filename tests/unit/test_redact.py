"""redact_url: passwords never reach logs or error messages."""

from __future__ import annotations

import pytest

from outbox_relay.redact import redact_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("amqp://guest:secret@host:5672/%2F", "amqp://guest:***@host:5672/%2F"),
        ("postgresql://app:s3cr3t@db.internal/orders", "postgresql://app:***@db.internal/orders"),
        ("amqps://u:p%40ss@broker/vhost?heartbeat=30", "amqps://u:***@broker/vhost?heartbeat=30"),
        ("redis://:secret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("amqp://user:p@ss@host/", "amqp://user:***@host/"),
    ],
)
def test_passwords_are_masked(url: str, expected: str) -> None:
    assert redact_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://localhost/postgres",
        "postgresql://app@db/orders",
        "amqp://broker:5672/%2F",
        "nats://127.0.0.1:4222",
    ],
)
def test_urls_without_password_are_unchanged(url: str) -> None:
    assert redact_url(url) == url


@pytest.mark.parametrize(
    "url",
    [
        "host=db user=app password=s3cr3t dbname=orders",
        "host=db password = 's3 cr3t' dbname=orders",
        "host=db sslpassword=s3cr3t sslkey=/k",
        "postgresql://app@db/orders?password=s3cr3t&sslmode=require",
    ],
)
def test_passwords_given_as_parameters_are_masked(url: str) -> None:
    redacted = redact_url(url)
    assert "s3" not in redacted
    assert "cr3t" not in redacted
    assert "password" in redacted
    assert "db" in redacted


def test_an_unparseable_url_still_loses_its_password() -> None:
    assert redact_url("amqp://guest:secret@[::1/") == "amqp://guest:***@[::1/"
