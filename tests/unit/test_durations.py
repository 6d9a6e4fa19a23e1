"""parse_duration: the CLI's --retention syntax."""

from __future__ import annotations

import pytest

from outbox_relay.cli.common import parse_duration
from outbox_relay.errors import ConfigError


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
    assert parse_duration("--retention", text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "d", "-5s", "5w", "1.5.2s", "5 days", "1e3", "s5"])
def test_bad_duration_names_the_option(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^--retention: .* is not a duration"):
        parse_duration("--retention", text)
