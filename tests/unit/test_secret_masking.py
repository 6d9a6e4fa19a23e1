"""Secrets stay masked whatever form they are printed in: re-encoded, cut into pieces by a parser
that misread the URL, in a webhook's query under any name, inside a JSON log line; and a URL a
client would misread is refused before it reaches one."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest

from outbox_relay.errors import ConfigError
from outbox_relay.redact import Scrubber, pieces_of, redact_url
from outbox_relay.relay.settings import RelaySettings

PASSWORD = "alpha1234/bravo5678#charlie90@delta1234:echo5678 foxtrot90"
URL = f"amqp://relay:{quote(PASSWORD, safe='')}@rabbit:5672/%2F"


@pytest.mark.parametrize(
    "printed",
    [
        PASSWORD,
        quote(PASSWORD, safe=""),
        quote(PASSWORD, safe="").lower(),
        quote(PASSWORD),  # '/' left as it is
        PASSWORD.replace(" ", "+"),  # form encoding
    ],
)
def test_a_password_is_masked_however_it_was_encoded(printed: str) -> None:
    assert Scrubber([URL])(f"before {printed} after") == "before *** after"


def test_the_pieces_a_parser_quotes_are_masked() -> None:
    scrub = Scrubber([URL])
    # urllib reads "relay:alpha1234" as host and port when the '/' is not encoded.
    assert scrub("Port could not be cast to integer value as 'alpha1234'") == (
        "Port could not be cast to integer value as '***'"
    )
    assert "delta1234" not in scrub('unexpected spaces found in "delta1234:echo5678 foxtrot90"')


def test_short_pieces_are_left_alone() -> None:
    # A password "my/secret": "my" would mask that word in every line; "secret" is masked.
    assert pieces_of("my/secret") == ["my", "secret"]
    assert Scrubber(["amqp://u:my%2Fsecret@h/"])("my secret") == "my ***"


def test_every_query_value_of_a_webhook_url_is_masked() -> None:
    url = "https://relay:pw@hooks.example/api/hook?code=azureFunctionKey1&sig=abc&format=json"

    shown = redact_url(url)

    assert shown == "https://relay:***@hooks.example/api/hook?code=***&sig=***&format=***"
    # The configured URL's long query values are secrets wherever they appear alone.
    assert Scrubber([url])("key azureFunctionKey1 used") == "key *** used"
    assert Scrubber([url])("format json") == "format json"


def test_a_masked_value_at_the_end_of_a_json_string_keeps_the_line_valid_json() -> None:
    line = json.dumps({"url": "http://h/x?a=1&token=abc123", "next": "nats://tok@h:4222"})

    masked = Scrubber()(line)

    assert json.loads(masked) == {"url": "http://h/x?a=***&token=***", "next": "nats://***@h:4222"}


def test_a_text_line_with_a_folded_password_is_masked() -> None:
    import logging

    from outbox_relay.observability.logs import TextFormatter

    formatter = TextFormatter(Scrubber(["amqp://u:two%20%20spaces%09tab@h/"]))
    record = logging.LogRecord("x", logging.INFO, "", 0, "got two  spaces\ttab", None, None)

    assert "spaces" not in formatter.format(record)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("amqp://u:xq1/zk2@rabbit:5672/%2F", "must percent-encode"),
        ("nats://u:a#b@nats:4222", "must percent-encode"),
        ("http://hooks:70000/x", "from 1 to 65535"),
        ("redis://cache:0/0", "got 0"),
        ("amqp://u:p@[rabbit/%2F", "IPv6"),
    ],
)
def test_a_broker_url_clients_would_misread_is_refused_naming_the_option(
    url: str, says: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        RelaySettings.from_mapping({"broker_url": url})

    message = str(caught.value)
    assert message.startswith("--broker-url (OUTBOX_RELAY_BROKER_URL): ")
    assert says in message
    assert "xq1" not in message
    assert "zk2" not in message
    assert "a#b" not in message


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("postgresql://app:s3cr%zzt@db/orders", "must percent-encode"),
        ("postgresql://app:sec/ret words@db/orders", "must percent-encode"),
        ("postgresql://app:s3cret@db:70000/orders", "got '70000'"),
        ("host=db port=0 password=s3cret", "got '0'"),
        ("postgresql://app:s3cret@db/orders?sslmode=bogus", 'invalid sslmode value: "bogus"'),
        ("postgresql://app:s3cret@[::1/orders", "cannot be parsed"),
    ],
)
def test_a_database_url_libpq_would_refuse_is_refused_without_its_password(
    url: str, says: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        RelaySettings.from_mapping({"database_url": url})

    message = str(caught.value)
    assert message.startswith("--database-url (OUTBOX_RELAY_DATABASE_URL): ")
    assert says in message
    for secret in ("s3cr", "ret words", "sec/"):
        assert secret not in message
