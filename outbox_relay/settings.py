"""Settings declared once.

Every setting is one field of a :class:`Settings` model: its name, type, default, validation and
help (the field's description) live there, and everything else is derived from it: the CLI flag
(``batch_size`` -> ``--batch-size``), the environment variable (``OUTBOX_RELAY_BATCH_SIZE``) and
the config-file key (``batch_size``). A :class:`Flag` in the field's ``Annotated`` metadata only
says what cannot be derived (a ``--x/--no-x`` pair, a secret, a positional argument).

Why pydantic: it validates exactly what the CLI, the environment and a config file hand over (all
strings, or TOML's own types) with one set of rules, refuses NaN and infinity, and reports the
field an error belongs to, which becomes one line naming the option. The CLI builds its Typer
options from the same fields (``outbox_relay.cli.options``), so adding an option touches one
declaration.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import ssl
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Self
from urllib.parse import urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo

from outbox_relay.errors import ConfigError
from outbox_relay.redact import Scrubber, redact_url
from outbox_relay.tls import CA_OPTION, CERT_OPTION, KEY_OPTION, TLS_SCHEMES, TlsFiles

ENV_PREFIX = "OUTBOX_RELAY_"


@dataclass(frozen=True, slots=True)
class Flag:
    """What a field's CLI option needs beyond its name, type, default and description."""

    # The option's declaration when it is not --field-name, e.g. "--webhook-batch/--webhook-per-event".
    decl: str | None = None
    # Kept out of describe(), reprs and logs; its value is also scrubbed from every log line.
    secret: bool = False
    # Read from OUTBOX_RELAY_<NAME> as well as from the flag.
    env: bool = True
    # A positional argument instead of an option.
    argument: bool = False
    metavar: str | None = None
    # The --help section it is listed under.
    panel: str | None = None
    # False: set in code or a config file only, never a CLI option.
    cli: bool = True


def flag_of(info: FieldInfo) -> Flag:
    """The field's Flags merged, outermost last (``Annotated[Port, Flag(panel=...)]`` keeps
    Port's metavar and adds the panel)."""
    merged = Flag()
    for item in info.metadata:
        if isinstance(item, Flag):
            changes = {
                name: getattr(item, name)
                for name in Flag.__dataclass_fields__
                if getattr(item, name) != getattr(_DEFAULT_FLAG, name)
            }
            merged = dataclasses.replace(merged, **changes)
    return merged


_DEFAULT_FLAG = Flag()


def key_of(field: str, info: FieldInfo) -> str:
    """The name a setting goes by outside Python: its alias (``schema``) or its field name."""
    return info.alias or field


def option_name(field: str, info: FieldInfo | None = None) -> str:
    """``batch_size`` -> ``--batch-size`` (or the field's own declaration's first name)."""
    flag = flag_of(info) if info is not None else Flag()
    if flag.argument:
        return field.upper()
    if flag.decl:
        return flag.decl.split("/", 1)[0]
    return "--" + field.replace("_", "-")


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def own_keys(model: type[BaseModel]) -> set[str]:
    """The keys a model accepts: its field names and their aliases."""
    return {*model.model_fields, *(i.alias for i in model.model_fields.values() if i.alias)}


def route(values: Any, model: type[BaseModel], into: str) -> Any:
    """Flat settings -> nested: keys ``model`` does not declare go into the mapping ``into``
    (so ``PublisherSettings(broker_url=..., nats_stream=...)`` works like a config-file table)."""
    if not isinstance(values, Mapping):
        return values
    own = own_keys(model)
    nested = dict(values.get(into) or {})
    routed = {key: value for key, value in values.items() if key in own and key != into}
    nested.update({key: value for key, value in values.items() if key not in own})
    routed[into] = nested
    return routed


class InvalidSettingsError(ConfigError):
    """Settings that do not validate; keeps pydantic's error so that a config file can name
    the key and the table it came from (cli/config_file.py) instead of the flag."""

    def __init__(self, message: str, model: type[BaseModel], error: ValidationError) -> None:
        super().__init__(message)
        self.model = model
        self.error = error


class Settings(BaseModel):
    """A frozen, validated group of settings; build it from any mapping of field names."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        allow_inf_nan=False,
        use_enum_values=False,
        validate_default=True,
        arbitrary_types_allowed=True,
        # `schema` is a field's alias (BaseModel has a `schema` attribute); code uses the name.
        populate_by_name=True,
    )

    def __init__(self, /, **values: Any) -> None:
        # Built in code, a bad value is a ConfigError too, named like an option.
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise InvalidSettingsError(describe_error(type(self), exc), type(self), exc) from None

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, where: str = "") -> Self:
        """Validate ``values`` (field name -> value, as strings from the CLI or the environment
        or typed values from a config file); a bad one raises one ConfigError naming it."""
        try:
            return cls.model_validate(dict(values))
        except ValidationError as exc:
            raise ConfigError(describe_error(cls, exc, where=where)) from None
        except ConfigError as exc:  # a nested model's own __init__ (e.g. RelaySettings.publisher)
            raise ConfigError(f"{where}: {exc}" if where else str(exc)) from None

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # Secrets never reach a repr (and so no log line or traceback that prints one).
        for name, value in super().__repr_args__():
            info = type(self).model_fields.get(name or "")
            yield name, ("***" if info is not None and flag_of(info).secret else value)

    def describe(self) -> dict[str, Any]:
        """The settings safe to log: secrets left out, URLs without passwords."""
        described: dict[str, Any] = {}
        for name, info in type(self).model_fields.items():
            if flag_of(info).secret:
                value = getattr(self, name)
                if isinstance(value, str) and "://" in value:
                    described[name] = redact_url(value)
                continue
            value = getattr(self, name)
            if isinstance(value, Settings):
                described.update(value.describe())
            elif value is not None and not isinstance(value, Mapping):
                described[name] = str(value) if not isinstance(value, int | float) else value
        return described

    def secrets(self) -> Iterator[str]:
        """Every secret value these settings hold (URLs whole: see redact.secrets_in)."""
        for name, info in type(self).model_fields.items():
            value = getattr(self, name)
            if isinstance(value, Settings):
                yield from value.secrets()
            elif flag_of(info).secret and isinstance(value, str) and value:
                yield value


# -- error messages --------------------------------------------------------------------------------

_MESSAGES = {
    "int_parsing": "is not a whole number",
    "int_from_float": "is not a whole number",
    "int_type": "is not a whole number",
    "float_parsing": "is not a number",
    "float_type": "is not a number",
    "finite_number": "must be a finite number",
    "bool_parsing": "is not true or false",
    "bool_type": "is not true or false",
    "string_type": "is not text",
    "missing": "is required",
    "extra_forbidden": "is not a setting",
}


def describe_error(model: type[BaseModel], exc: ValidationError, *, where: str = "") -> str:
    """The first validation error as one line: ``--batch-size: must be greater than 0, got 0``.

    From the CLI the option is named with its variable (``--batch-size (OUTBOX_RELAY_BATCH_SIZE)``);
    with ``where`` (a config file and table) by its key."""
    error = exc.errors(include_url=False)[0]
    location = [str(part) for part in error["loc"]]
    # A nested group (RelaySettings.publisher) is named by its own field's option.
    while len(location) > 1 and _field(model, location[0]) is not None:
        nested = _field(model, location[0])
        assert nested is not None
        if not (isinstance(nested.annotation, type) and issubclass(nested.annotation, BaseModel)):
            break
        model, location = nested.annotation, location[1:]
    field = location[0] if location else ""
    info = _field(model, field)
    if where:
        name = ".".join(location) or "settings"
    elif info is None:
        name = option_name(field) if field else "settings"
    else:
        flag = flag_of(info)
        name = option_name(field, info)
        if flag.env and not flag.argument:
            name = f"{name} ({env_name(field)})"
    kind = error["type"]
    ctx = error.get("ctx") or {}
    given = _shown(error.get("input"), info)
    if kind in ("missing", "extra_forbidden"):
        text = _MESSAGES[kind]
    elif kind in _MESSAGES:
        text = f"{given} {_MESSAGES[kind]}"
    elif kind in _BOUNDS:
        text = f"must be {_BOUNDS[kind]} {next(iter(ctx.values()))}, got {given}"
    elif kind == "enum":
        text = f"{given} is not one of {ctx.get('expected', '')}".replace("'", "")
    elif kind == "value_error":
        text = str(ctx.get("error", error["msg"]))
    else:
        text = f"{error['msg'][0].lower()}{error['msg'][1:]}, got {given}"
    if not field:  # a rule across settings: its message names them
        name = ""
    if info is not None and flag_of(info).secret and isinstance(error.get("input"), str):
        # A parser's message may quote the value, or a piece of it (libpq quotes the token it
        # could not decode): nothing of a secret reaches the message.
        text = Scrubber([error["input"]])(text)
    prefix = ": ".join(part for part in (where, name) if part)
    return f"{prefix}: {text}" if prefix else text


def _field(model: type[BaseModel], key: str) -> FieldInfo | None:
    return model.model_fields.get(key) or next(
        (info for info in model.model_fields.values() if info.alias == key), None
    )


_BOUNDS = {
    "greater_than": "greater than",
    "greater_than_equal": "at least",
    "less_than": "less than",
    "less_than_equal": "at most",
}


def _shown(value: Any, info: FieldInfo | None) -> str:
    if info is not None and flag_of(info).secret:
        return repr(redact_url(value)) if isinstance(value, str) else "(hidden)"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return repr(value) if isinstance(value, str) else str(value)


# -- shared value types ------------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: Any) -> Any:
    """'90' / '90s' / '15m' / '24h' / '7d' -> seconds; numbers pass through."""
    if not isinstance(value, str):
        return value
    match = _DURATION.fullmatch(value.strip())
    if not match:
        raise ValueError(f"{value!r} is not a duration (e.g. 30s, 15m, 24h, 7d)")
    return float(match[1]) * _UNIT_SECONDS[match[2]]


# Seconds, finite and above zero; accepts "30s", "15m", "24h", "7d" too.
# Bounded so that a typo (a few digits too many) is an error, not an interval nobody meant.
Seconds = Annotated[
    float, BeforeValidator(parse_duration), Field(gt=0, le=366 * 86400), Flag(metavar="SECONDS")
]
Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    Field(gt=0, le=10 * 366 * 86400),
    Flag(metavar="DURATION"),
]
Port = Annotated[int, Field(ge=1, le=65535), Flag(metavar="PORT")]
# Counts and sizes bounded well below anything that overflows PostgreSQL's integer or a buffer.
Count = Annotated[int, Field(gt=0, le=2_147_483_647), Flag(metavar="INTEGER")]

SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,39}")


def check_schema_name(schema: str) -> str:
    """Plain lowercase identifiers, so they never need quoting in SQL; not PostgreSQL's own."""
    if not SCHEMA_NAME.fullmatch(schema) or schema.startswith("pg_"):
        raise ValueError(
            f"{schema!r} is not a usable schema name (lowercase letters, digits and '_', at "
            "most 40 characters, not starting with pg_; e.g. 'public' or 'outbox')"
        )
    if schema == "information_schema":
        raise ValueError("'information_schema' is PostgreSQL's own schema; choose another")
    return schema


SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_UNENCODED_USER = re.compile(r"[/?#@\s:]|%(?![0-9A-Fa-f]{2})")
_UNENCODED_PASSWORD = re.compile(r"[/?#@\s]|%(?![0-9A-Fa-f]{2})")


def unencoded_userinfo(url: str) -> str | None:
    """Why ``url`` (one that did not parse) failed, when its user info holds characters a URL
    must percent-encode: a parser then splits the password, and would quote a piece of it."""
    _scheme, sep, rest = url.partition("://")
    at = rest.rfind("@")
    if not sep or at < 0:
        return None
    user, _colon, password = rest[:at].partition(":")
    if _UNENCODED_USER.search(user) or _UNENCODED_PASSWORD.search(password):
        # The URL last: text after it on the line would be masked as if it were its password.
        return (
            "the user name or password holds characters a URL must percent-encode (/ as %2F, "
            f"# as %23, ? as %3F, @ as %40, % as %25, a space as %20): {redact_url(url)!r}"
        )
    return None


def check_database_url(url: str) -> str:
    if not url.startswith(("postgresql://", "postgres://")) and "=" not in url:
        raise ValueError(
            f"{redact_url(url)!r} is not a PostgreSQL URL "
            "(expected postgresql://user@host:5432/dbname or a key=value conninfo)"
        )
    try:
        parameters = conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        # libpq quotes the URL, or the part it could not read, password included.
        reason = Scrubber([url])(str(exc).replace(url, redact_url(url)).strip())
        raise ValueError(unencoded_userinfo(url) or f"cannot be parsed: {reason}") from None
    # What libpq would refuse only when connecting, refused here: before anything connects.
    for port in str(parameters.get("port") or "").split(","):
        if port and not (port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError(f"the port must be a number from 1 to 65535, got {port!r}")
    sslmode = parameters.get("sslmode")
    if sslmode is not None and sslmode not in SSL_MODES:
        # libpq's own words, and the choices.
        raise ValueError(f'invalid sslmode value: "{sslmode}" (one of {", ".join(SSL_MODES)})')
    # Certificate files with an sslmode that does not insist on TLS: libpq's default, prefer,
    # falls back to plaintext when TLS fails (a certificate that does not verify included),
    # and disable ignores them; the files would look like a verified link that is not one.
    effective = sslmode or os.environ.get("PGSSLMODE") or "prefer"
    files = sorted(key for key in _SSL_FILES if parameters.get(key))
    if files and effective in _PLAINTEXT_ALLOWED:
        raise ValueError(
            f"{' and '.join(files)} given, but sslmode is {effective}"
            f"{'' if sslmode or os.environ.get('PGSSLMODE') else ' (libpq default)'}, which "
            "may connect without TLS: add sslmode=verify-full (or verify-ca, require) to the URL"
        )
    return url


# libpq parameters naming certificate files, and the modes that allow a plaintext connection.
_SSL_FILES = ("sslrootcert", "sslcert", "sslkey", "sslcrl")
_PLAINTEXT_ALLOWED = ("disable", "allow", "prefer")


def check_broker_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme or not rest:
        raise ValueError(f"{redact_url(url)!r} is not a URL (e.g. amqp://user:pass@host:5672/%2F)")
    # Every client reads host and port the way urllib does; a port it cannot read is an error
    # each would report differently, some quoting a piece of the password.
    try:
        port = urlsplit(url).port
    except ValueError:
        raise ValueError(
            unencoded_userinfo(url)
            or f"the port must be a number from 1 to 65535, and an IPv6 address in []: "
            f"{redact_url(url)!r}"
        ) from None
    if port == 0:
        raise ValueError(f"the port must be a number from 1 to 65535, got 0: {redact_url(url)!r}")
    return url


DEFAULT_DATABASE_URL = "postgresql://localhost/postgres"
DEFAULT_BROKER_URL = "amqp://guest:guest@localhost:5672/%2F"

# The declarations every command shares.
DatabaseUrl = Annotated[
    str,
    AfterValidator(check_database_url),
    Field(
        description="PostgreSQL URL: the outbox database (relay commands) or the consumer's "
        "own database with its inbox (consumer commands)."
    ),
    Flag(secret=True, metavar="URL"),
]
BrokerUrl = Annotated[
    str,
    AfterValidator(check_broker_url),
    Field(description="Broker URL; the scheme picks the broker."),
    Flag(secret=True, metavar="URL"),
]
_TLS_PANEL = "Broker TLS"
_TLS_APPLIES = "TLS broker URLs only: " + ", ".join(f"{scheme}://" for scheme in TLS_SCHEMES)


def check_pem_file(path: str | None) -> str | None:
    """A file name, not a directory or nothing; whether it can be read and holds PEM is checked
    when the connection's TLS context is built, at start-up (with the cause named)."""
    if path is not None and not path.strip():
        raise ValueError("is empty (give a PEM file, or leave the option out)")
    return path


class BrokerLinkSettings(Settings):
    """The broker URL and the TLS files of its link, shared by the relay's publishers and the
    consumer commands: declared once here, so every command taking a broker takes the same
    TLS options (``--broker-ca-file``, ``OUTBOX_RELAY_BROKER_CA_FILE``, ...)."""

    broker_url: BrokerUrl = DEFAULT_BROKER_URL
    broker_ca_file: Annotated[
        str | None,
        AfterValidator(check_pem_file),
        Field(
            description="PEM file of the CA(s) the broker's certificate must be signed by "
            "(instead of the system's trust store); the host name is verified as well. "
            f"{_TLS_APPLIES}."
        ),
        Flag(metavar="FILE", panel=_TLS_PANEL),
    ] = None
    broker_cert_file: Annotated[
        str | None,
        AfterValidator(check_pem_file),
        Field(
            description="PEM client certificate for brokers that require one (it may hold "
            "the key too)."
        ),
        Flag(metavar="FILE", panel=_TLS_PANEL),
    ] = None
    broker_key_file: Annotated[
        str | None,
        AfterValidator(check_pem_file),
        Field(description="PEM private key (unencrypted) of --broker-cert-file."),
        Flag(metavar="FILE", panel=_TLS_PANEL),
    ] = None

    @model_validator(mode="after")
    def _tls_options_need_tls(self) -> Self:
        # An option that cannot take effect is refused: a CA file next to a plaintext URL would
        # otherwise look like a verified link.
        scheme = self.broker_url.partition("://")[0].lower()
        options = (
            (CA_OPTION, self.broker_ca_file),
            (CERT_OPTION, self.broker_cert_file),
            (KEY_OPTION, self.broker_key_file),
        )
        for option, value in options:
            if value is not None and scheme not in TLS_SCHEMES:
                raise ValueError(
                    f"{option}: applies to {_TLS_APPLIES}, not {scheme}:// (use the TLS scheme "
                    "in --broker-url, or remove the option)"
                )
        if self.broker_key_file is not None and self.broker_cert_file is None:
            raise ValueError(f"{KEY_OPTION}: needs {CERT_OPTION}, the certificate it belongs to")
        return self

    @property
    def broker_tls(self) -> TlsFiles:
        return TlsFiles(self.broker_ca_file, self.broker_cert_file, self.broker_key_file)

    def broker_tls_context(self) -> ssl.SSLContext | None:
        """The verifying client context of a TLS broker URL (None for a plaintext one); built
        at start-up, so an unreadable file is one ConfigError before anything connects."""
        if self.broker_url.partition("://")[0].lower() not in TLS_SCHEMES:
            return None
        return self.broker_tls.context()


# Declare as `schema_name: Schema = "public"`: the key is `schema` (--schema, OUTBOX_RELAY_SCHEMA).
Schema = Annotated[
    str,
    AfterValidator(check_schema_name),
    Field(
        alias="schema",
        description="Schema holding the outbox tables (consumer commands: the inbox table).",
    ),
    Flag(metavar="NAME"),
]


EXCHANGE_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,255}")


def check_exchange(name: str) -> str:
    """AMQP exchange names: up to 255 letters, digits, '-', '_', '.' and ':'."""
    if not EXCHANGE_NAME.fullmatch(name):
        raise ValueError(
            f"{name!r} is not an exchange name (1-255 letters, digits, '-', '_', '.', ':')"
        )
    return name


Exchange = Annotated[
    str,
    AfterValidator(check_exchange),
    Field(description="The durable topic exchange the relay publishes to (RabbitMQ)."),
    Flag(metavar="NAME"),
]
