"""Routing rules: parsing, first match wins, the default, destinations checked per broker."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from outbox_relay.messages import OutboxMessage
from outbox_relay.publishers.base import PublisherSettings
from outbox_relay.routing import Route, Router, parse_route


def message(
    event_type: str = "order.created",
    aggregate_type: str | None = "order",
    headers: dict[str, Any] | None = None,
) -> OutboxMessage:
    return OutboxMessage(
        id=1,
        event_id="e",
        event_type=event_type,
        aggregate_type=aggregate_type,
        aggregate_id="1",
        payload=b"{}",
        headers=headers or {},
        created_at=datetime.now(UTC),
    )


@pytest.mark.parametrize(
    ("rule", "route"),
    [
        ("order.*=orders", Route("type", "order.*", "orders")),
        ("type:#.created=created", Route("type", "#.created", "created")),
        ("aggregate:customer=customers", Route("aggregate", "customer", "customers")),
        ("header.tenant:acme=acme", Route("header", "acme", "acme", header="tenant")),
        ("header.n:=empty", Route("header", "", "empty", header="n")),
        ("order.*=https://h/x?a=b", Route("type", "order.*", "https://h/x?a=b")),
    ],
)
def test_rules_parse(rule: str, route: Route) -> None:
    assert parse_route(rule) == route


@pytest.mark.parametrize(
    "rule", ["order.*", "=orders", "order.*=", "order..x=a", "aggregate:=a", "header.x=a", "a b=c"]
)
def test_malformed_rules_are_refused_with_an_example(rule: str) -> None:
    with pytest.raises(ValueError, match=r"route"):
        parse_route(rule)


def test_the_first_matching_rule_wins_and_the_rest_go_to_the_default() -> None:
    router = Router.of(
        ["header.tenant:acme=acme", "order.#=orders", "aggregate:order=by-aggregate"], "events"
    )
    assert router.destination(message(headers={"tenant": "acme"})) == "acme"
    assert router.destination(message()) == "orders"
    assert router.destination(message("refund.issued")) == "by-aggregate"
    assert router.destination(message("refund.issued", aggregate_type="x")) == "events"
    assert router.destinations() == ["events", "acme", "orders", "by-aggregate"]


def test_header_values_compare_as_text_and_json() -> None:
    router = Router.of(["header.vip:true=vip", "header.shard:3=three"], "events")
    assert router.destination(message(headers={"vip": True})) == "vip"
    assert router.destination(message(headers={"vip": "true"})) == "vip"
    assert router.destination(message(headers={"shard": 3})) == "three"
    assert router.destination(message(headers={"shard": 4})) == "events"


def test_type_only_rules_are_remembered_per_type() -> None:
    router = Router.of(["order.*=orders"], "events")
    assert router.destination(message()) == "orders"
    assert router.destination(message("customer.created")) == "events"
    assert router._cache == {"order.created": "orders", "customer.created": "events"}


def test_no_rules_means_the_default_for_every_event() -> None:
    router = PublisherSettings.from_mapping({"exchange": "main"}).router()
    assert not router
    assert router.destination(message()) == "main"


@pytest.mark.parametrize(
    ("broker_url", "rule", "default"),
    [
        ("amqp://guest:guest@h/%2F", "order.*=orders", "events"),
        ("nats://h:4222", "order.*=tenant.acme", "events"),
        ("redis://h:6379/0", "order.*=orders", "events"),
        ("mqtt://h:1883", "order.*=orders", "events"),
        ("https://h/hook", "order.*=https://other/hook", "https://h/hook"),
    ],
)
def test_destinations_are_what_each_broker_routes_by(
    broker_url: str, rule: str, default: str
) -> None:
    settings = PublisherSettings.from_mapping({"broker_url": broker_url, "route": [rule]})
    assert settings.router().destinations() == [default, rule.partition("=")[2]]


@pytest.mark.parametrize(
    ("broker_url", "rule"),
    [
        ("amqp://guest:guest@h/%2F", "order.*=a b"),
        ("nats://h:4222", "order.*=a.>"),
        ("mqtt://h:1883", "order.*=a/b"),
        ("https://h/hook", "order.*=orders"),
    ],
)
def test_a_destination_the_broker_cannot_route_by_is_refused(broker_url: str, rule: str) -> None:
    with pytest.raises(Exception, match=r"--route"):
        PublisherSettings.from_mapping({"broker_url": broker_url, "route": [rule]})


def test_webhook_route_urls_are_secrets_and_redacted_when_described() -> None:
    settings = PublisherSettings.from_mapping(
        {"broker_url": "https://h/hook", "route": ["order.*=https://user:pw@other/hook"]}
    )
    assert "https://user:pw@other/hook" in list(settings.secrets())
    assert "pw" not in str(settings.describe()["routes"])
