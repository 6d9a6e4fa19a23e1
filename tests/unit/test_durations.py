"""Durations: the syntax of --retention, --inbox-retention and every seconds option."""

from __future__ import annotations

from typing import Annotated

import pytest

from outbox_relay.errors import ConfigError
from outbox_relay.settings import Duration, Settings, parse_duration


class Retention(Settings):
    retention: Annotated[Duration, "the option under test"] = 60.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("90s", 90.0),
        ("1.5s", 1.5),
        ("250ms", 0.25),
        ("15m", 900.0),
        ("24h", 86400.0),
        ("7d", 604800.0),
        (" 7 d ", 604800.0),
        ("0", 0.0),
    ],
)
def test_durations_in_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


def test_numbers_pass_through_unchanged() -> None:
    assert parse_duration(42.5) == 42.5


@pytest.mark.parametrize("text", ["", "d", "-5s", "5w", "1.5.2s", "5 days", "1e3", "s5", "nan"])
def test_bad_duration_names_the_option(text: str) -> None:
    with pytest.raises(
        ConfigError, match=r"^--retention \(OUTBOX_RELAY_RETENTION\): .* is not a duration"
    ):
        Retention.from_mapping({"retention": text})


@pytest.mark.parametrize("value", ["0", "0s", 0, -1.0, float("inf"), float("nan")])
def test_a_duration_must_be_finite_and_above_zero(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^--retention"):
        Retention.from_mapping({"retention": value})
