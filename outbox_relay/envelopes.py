"""CloudEvents 1.0: an outbox row as its attribute set and as the JSON event format, built here
once; each publisher maps them onto its transport per the protocol binding (docs/cloudevents.md).

Attributes: ``specversion`` 1.0, ``id`` = event id, ``source`` (--ce-source), ``type`` = event
type, ``datacontenttype`` application/json, ``time`` = created_at (RFC 3339), ``subject`` =
aggregate id (when there is one), the extension ``aggregatetype`` (when there is one), and each
row header as an extension; ``traceparent``/``tracestate`` are row headers already (the relay
writes its publish span there), so they become the Distributed Tracing extension's attributes.

Extension names must be lowercase letters and digits. A row header whose key is such a name
(and not one of the names above) keeps it; any other key is lowercased and stripped of other
characters, and when that leaves nothing, a reserved name or a name another header of the row
already has, it gets the first 8 hex digits of the SHA-256 of the original key appended
(``Tenant-ID`` -> ``tenantid``; ``id`` -> ``ida5614527``; see :func:`extension_names`).
Headers whose value is null are left out (CloudEvents has no null).
"""

from __future__ import annotations

import enum
import functools
import hashlib
import json
import re
from datetime import datetime
from typing import Any, Final
from urllib.parse import quote

import psycopg
from psycopg.conninfo import conninfo_to_dict

from outbox_relay.messages import OutboxMessage

SPECVERSION: Final = "1.0"
DATA_CONTENT_TYPE: Final = "application/json"
STRUCTURED_CONTENT_TYPE: Final = "application/cloudevents+json"
BATCH_CONTENT_TYPE: Final = "application/cloudevents-batch+json"
AGGREGATE_TYPE: Final = "aggregatetype"
# What a receiver looks for to tell structured mode from binary mode (every binding).
CLOUDEVENTS_MEDIA_TYPE: Final = "application/cloudevents"


class MessageFormat(enum.StrEnum):
    NATIVE = "native"  # the relay's own mapping per broker (README's broker table)
    BINARY = "cloudevents-binary"  # attributes in the transport's headers, the payload as body
    STRUCTURED = "cloudevents-structured"  # the JSON event format as body


# Context attributes of the spec, the JSON format's members, and the relay's own extension:
# no row header may take these names.
RESERVED: Final = frozenset(
    {
        "specversion",
        "id",
        "source",
        "type",
        "datacontenttype",
        "dataschema",
        "subject",
        "time",
        "data",
        "database64",  # data_base64 sanitised: keep it unambiguous
        AGGREGATE_TYPE,
    }
)
_NAME: Final = re.compile(r"[a-z0-9]+")
_NOT_NAME: Final = re.compile(r"[^a-z0-9]+")
# HTTP and NATS header values: printable ASCII except space, '"' and '%' stays as it is; the
# rest is percent-encoded as UTF-8 (HTTP binding 3.1.3.2, NATS binding 3.1.3.2).
_HEADER_SAFE: Final = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in ' "%')
# CloudEvents Integer is a signed 32-bit number; larger integers travel as their text.
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1


def is_extension_name(name: str) -> bool:
    return bool(_NAME.fullmatch(name)) and name not in RESERVED


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:8]


@functools.lru_cache(maxsize=1024)
def extension_names(keys: tuple[str, ...]) -> tuple[str, ...]:
    """The extension name of each row header key, in the same order (cached: rows of one
    producer share their header keys, so the hot path is one dictionary look-up).

    Keys that are valid names claim them first; the others follow in sorted order, each
    sanitised, with a digest of the key appended when the sanitised name is empty, reserved
    or taken: the result depends on the set of keys only, not on their order."""
    names: dict[str, str] = {key: key for key in keys if is_extension_name(key)}
    taken = set(names.values())
    for key in sorted(k for k in keys if k not in names):
        name = _NOT_NAME.sub("", key.lower())
        if not name or name in RESERVED or name in taken:
            name = f"{name or 'header'}{_digest(key)}"
        names[key] = name
        taken.add(name)
    return tuple(names[key] for key in keys)


def extension_value(value: Any) -> Any:
    """A header's value as an attribute value of the CloudEvents type system: a string, a
    Boolean or a 32-bit Integer as they are, any other JSON as its compact text."""
    if isinstance(value, str | bool):
        return value
    if isinstance(value, int) and _INT_MIN <= value <= _INT_MAX:
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def canonical(value: Any) -> str:
    """An attribute value's canonical string (what header-only transports carry)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def percent_encoded(value: str) -> str:
    """A canonical string as an HTTP or NATS header value (their bindings' percent-encoding)."""
    return quote(value, safe=_HEADER_SAFE)


def rfc3339(moment: datetime) -> str:
    text = moment.isoformat()
    if moment.tzinfo is None:
        return text + "Z"  # the outbox stores timestamptz; a naive time is UTC
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def default_source(database_url: str, schema: str) -> str:
    """``postgresql://HOST[:PORT]/DATABASE/SCHEMA``: names the outbox, never its credentials."""
    try:
        params = conninfo_to_dict(database_url)
    except psycopg.ProgrammingError:  # the URL is checked elsewhere; a source must not fail
        params = {}
    host = str(params.get("host") or "localhost")
    port = params.get("port")
    where = quote(host, safe=",[]:") + (f":{port}" if port else "")
    database = quote(str(params.get("dbname") or params.get("user") or ""), safe="")
    return f"postgresql://{where}/{database}/{quote(schema, safe='')}"


class CloudEvents:
    """Builds a row's CloudEvent for one source; shared by every publisher (one per publisher)."""

    __slots__ = ("_last_time", "fixed", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        #: The attributes every event of this source shares (``datacontenttype`` aside, which
        #: each binding places on its own): a binding may encode them once.
        self.fixed: dict[str, str] = {"specversion": SPECVERSION, "source": source}
        # The last ``time`` rendered, with its moment: the rows of one transaction share
        # created_at (PostgreSQL's now()), and a backlog comes in runs of them.
        self._last_time: tuple[datetime, str] | None = None

    def attributes(self, message: OutboxMessage) -> dict[str, Any]:
        """Every attribute (``datacontenttype`` included), values typed per
        :func:`extension_value`."""
        return {**self.fixed, "datacontenttype": DATA_CONTENT_TYPE, **self.varying(message)}

    def varying(self, message: OutboxMessage) -> dict[str, Any]:
        """The attributes of the row but :attr:`fixed` and ``datacontenttype``: ``id``,
        ``type``, ``time``, ``subject`` and ``aggregatetype`` when the row has them, and the
        extensions of its headers."""
        attributes: dict[str, Any] = {
            "id": message.event_id,
            "type": message.event_type,
            "time": self.time(message.created_at),
        }
        if message.aggregate_id:  # an empty subject is not allowed
            attributes["subject"] = message.aggregate_id
        if message.aggregate_type is not None:
            attributes[AGGREGATE_TYPE] = message.aggregate_type
        headers = message.headers
        if headers:
            for name, value in zip(extension_names(tuple(headers)), headers.values(), strict=True):
                if value is not None:
                    attributes[name] = extension_value(value)
        return attributes

    def time(self, moment: datetime) -> str:
        """:func:`rfc3339` of ``moment``, remembered for the next row (the same moment, zone
        and fold render the same text; equal moments in other zones do not)."""
        last = self._last_time
        if (
            last is not None
            and last[0] == moment
            and last[0].tzinfo is moment.tzinfo
            and last[0].fold == moment.fold
        ):
            return last[1]
        text = rfc3339(moment)
        self._last_time = (moment, text)
        return text

    def text_attributes(self, message: OutboxMessage) -> dict[str, str]:
        """The attributes as canonical strings (MQTT user properties, Redis fields, ...)."""
        return {name: canonical(value) for name, value in self.attributes(message).items()}

    def structured(self, message: OutboxMessage) -> bytes:
        """The JSON event format; ``data`` is the payload as PostgreSQL rendered it."""
        head = json.dumps(self.attributes(message), separators=(",", ":"), ensure_ascii=False)
        return head[:-1].encode() + b',"data":' + message.payload + b"}"
