"""``--config relay.toml``: many outboxes for one ``serve`` (and ``status``) process.

The file holds no settings of its own: a ``[defaults]`` table and one ``[[outbox]]`` table per
outbox, whose keys are the serve options' keys (``batch_size``, ``broker_url``, ``nats_stream``,
...). Each outbox's settings are built by the same models the CLI builds them with
(``RelaySettings``, the broker's ``BrokerOptions``, ``ObservabilitySettings``), so a key means
and validates exactly what its flag does. Precedence, highest first: an option given on the
command line or as an ``OUTBOX_RELAY_*`` variable (it applies to every outbox), the outbox's own
table, ``[defaults]``, the built-in default. docs/config-file.md is the user's side of this.

Every error is one line naming the file, the table (``outbox[2] "billing"``, counted from 1)
and the key, raised before anything connects.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from psycopg.conninfo import conninfo_to_dict
from pydantic import AfterValidator, Field

from outbox_relay.errors import ConfigError
from outbox_relay.observability.settings import ObservabilitySettings
from outbox_relay.publishers import broker_options, check_options
from outbox_relay.publishers.base import PublisherSettings
from outbox_relay.relay.settings import RELAY_NAME, Mode, RelaySettings, check_relay_name
from outbox_relay.settings import (
    Flag,
    InvalidSettingsError,
    Settings,
    describe_error,
    env_name,
    option_name,
    own_keys,
)


class ConfigOption(Settings):
    """The ``--config`` option of the commands that read a config file."""

    config: Annotated[
        str | None,
        Field(
            description="A TOML file with a [defaults] table and one [[outbox]] table per "
            "outbox: relay them all from this process (docs/config-file.md). Options given "
            "here or as variables apply to every outbox and win over the file."
        ),
        Flag(metavar="FILE"),
    ] = None


class OutboxOption(ConfigOption):
    """``--config`` and ``--outbox NAME`` of the commands that work on one outbox."""

    outbox: Annotated[
        str | None,
        AfterValidator(check_relay_name),
        Field(
            description="With --config: the outbox (its name in the file) to work on; needed "
            "when the file has more than one."
        ),
        Flag(metavar="NAME"),
    ] = None


# Keys naming one outbox: given on the command line with --config they would point every
# outbox at one database (or one slot), so they are refused there.
PER_OUTBOX = ("database_url", "schema", "schema_name", "slot_name", "publication")


@dataclass(frozen=True, slots=True)
class Outbox:
    """One outbox to relay: its name (None for the one outbox of a run without --config)."""

    name: str | None
    settings: RelaySettings
    # A glob (``schemas = "tenant_*"``): every matching migrated schema is relayed, each as
    # an outbox named ``<name>:<schema>`` with these settings; ``settings.schema_name`` unused.
    schemas: str | None = None


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """A config file, validated: every outbox's settings and the process's observability."""

    path: str
    outboxes: list[Outbox]
    observability: ObservabilitySettings

    def secrets(self) -> Iterator[str]:
        for outbox in self.outboxes:
            yield from outbox.settings.secrets()

    def named(self, name: str) -> Outbox:
        for outbox in self.outboxes:
            if outbox.name == name:
                return outbox
        names = ", ".join(repr(o.name) for o in self.outboxes)
        raise ConfigError(
            f"{option_name('outbox')} ({env_name('outbox')}): {name!r} is not an outbox of "
            f"{self.path} (it has {names})"
        )


def expand_schemas(config: RelayConfig) -> list[Outbox]:
    """Every outbox of the file, each ``schemas`` glob replaced by the schemas it matches now
    (named ``<name>:<schema>``), for the one-shot commands (status, migrate)."""
    from outbox_relay.db.connect import connection
    from outbox_relay.db.discovery import outbox_schemas

    found: list[Outbox] = []
    for outbox in config.outboxes:
        settings, pattern = outbox.settings, outbox.schemas
        if pattern is None:
            found.append(outbox)
            continue
        with connection(settings.database_url, application_name="outbox-relay") as conn:
            schemas = outbox_schemas(conn, pattern, ready=False)
        found += [
            Outbox(f"{outbox.name}:{schema}", settings.model_copy(update={"schema_name": schema}))
            for schema in schemas
        ]
    return found


def one_outbox(values: Mapping[str, Any], model: type[Settings]) -> dict[str, Any]:
    """A one-outbox command's values (``dead``, ``slot``, ``emit``): with ``--config``, the
    outbox's database_url, schema, slot_name and publication come from the file (those the
    command's ``model`` takes); without, ``values`` as they are."""
    chosen = OutboxOption.from_mapping(
        {k: v for k, v in values.items() if k in own_keys(OutboxOption)}
    )
    rest = {k: v for k, v in values.items() if k not in own_keys(OutboxOption)}
    if chosen.config is None:
        if chosen.outbox is not None:
            raise ConfigError(
                f"{option_name('outbox')} ({env_name('outbox')}): applies with --config only "
                "(the file names the outboxes)"
            )
        return rest
    given = {k: v for k, v in rest.items() if k in PER_OUTBOX}
    config = load(chosen.config, given, os.environ, observability=False)
    if chosen.outbox is not None:
        outbox = config.named(chosen.outbox)
    elif len(config.outboxes) == 1:
        outbox = config.outboxes[0]
    else:
        names = ", ".join(str(o.name) for o in config.outboxes)
        raise ConfigError(
            f"{option_name('outbox')} ({env_name('outbox')}): is required: {config.path} has "
            f"{len(config.outboxes)} outboxes ({names})"
        )
    if outbox.schemas is not None:
        raise ConfigError(
            f"{option_name('outbox')} ({env_name('outbox')}): {outbox.name!r} relays the schemas "
            f"{outbox.schemas!r}: name one with --database-url and --schema instead"
        )
    settings = outbox.settings
    found = {
        "database_url": settings.database_url,
        "schema": settings.schema_name,
        "slot_name": settings.slot_name,
        "publication": settings.publication,
    }
    keys = own_keys(model)
    rest.update({k: v for k, v in found.items() if k in keys and v is not None})
    return rest


def _relay_keys() -> set[str]:
    keys = own_keys(RelaySettings) | own_keys(PublisherSettings)
    for _schemes, options in broker_options():
        keys |= own_keys(options)
    return keys - {"publisher", "options"}


_VARIABLE = re.compile(r"\$\{([^}]*)\}|\$\$\{")
_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def expand(value: Any, environ: Mapping[str, str], where: str) -> Any:
    """``${VAR}`` in text values (and lists of them) -> the variable's value; ``$${`` is a
    literal ``${``. An unset variable is an error: a secret left out is not an empty password."""
    if isinstance(value, list):
        return [expand(item, environ, where) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match[0] == "$${":
            return "${"
        name = match[1]
        if not _VARIABLE_NAME.fullmatch(name):
            raise ConfigError(f"{where}: ${{{name}}} is not a variable name (e.g. ${{DB_URL}})")
        if name not in environ:
            raise ConfigError(f"{where}: ${{{name}}} is not set in the environment")
        return environ[name]

    return _VARIABLE.sub(substitute, value)


def load(
    path: str,
    given: Mapping[str, Any],
    environ: Mapping[str, str],
    *,
    observability: bool = True,
) -> RelayConfig:
    """Read and validate ``path``. ``given``: the serve options given explicitly (command line
    or environment, as text), which apply to every outbox. ``observability``: whether the
    command reads the observability keys (status does not: they are still checked as keys)."""
    if not path:
        raise ConfigError(f"{_flag()}: is empty (give the path of a TOML file)")
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"{_flag()}: {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{_flag()}: {path}: is a directory, not a TOML file") from None
    except OSError as exc:
        raise ConfigError(f"{_flag()}: {path}: cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: is not UTF-8 text (TOML files are)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: is not valid TOML: {exc}") from None
    return parse(path, document, given, environ, observability=observability)


def parse(
    path: str,
    document: Mapping[str, Any],
    given: Mapping[str, Any],
    environ: Mapping[str, str],
    *,
    observability: bool = True,
) -> RelayConfig:
    """Validate a parsed config file (see :func:`load`)."""
    for key in document:
        if key not in ("defaults", "outbox"):
            raise ConfigError(
                f"{path}: {key}: is not a table of a config file (use [defaults] and "
                "[[outbox]] tables)"
            )
    for key in given:
        if key in PER_OUTBOX:
            key = "schema" if key == "schema_name" else key
            raise ConfigError(
                f"{option_name(key)} ({env_name(key)}): names one outbox and cannot be combined with "
                f"--config {path} (set it in the file's [[outbox]] tables)"
            )
    relay_keys = _relay_keys()
    observability_keys = own_keys(ObservabilitySettings)
    defaults = document.get("defaults", {})
    if not isinstance(defaults, dict):
        raise ConfigError(f"{path}: defaults: must be a table ([defaults])")
    defaults_at = f"{path}: [defaults]"
    for key in ("name", "schemas"):
        if key in defaults:
            raise ConfigError(f"{defaults_at}: {key}: belongs in an [[outbox]] table")
    defaults = _checked(defaults, defaults_at, relay_keys | observability_keys, environ)
    tables = document.get("outbox")
    if not tables:
        raise ConfigError(f"{path}: no [[outbox]] table (at least one outbox is needed)")
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{path}: outbox: must be [[outbox]] tables (an array of tables)")
    cli_relay = {k: v for k, v in given.items() if k in relay_keys}
    outboxes: list[Outbox] = []
    places: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    slots: dict[tuple[Any, ...], str] = {}
    for number, table in enumerate(tables, start=1):
        name = table.get("name")
        label = f"outbox[{number}]" + (f' "{name}"' if isinstance(name, str) else "")
        at = f"{path}: {label}"
        _check_name(name, at, places)
        places[name] = label
        schemas = table.get("schemas")
        if schemas is not None:
            _check_schemas(schemas, table, at)
        for key in table:
            if key in observability_keys:
                raise ConfigError(
                    f"{at}: {key}: applies to the whole process; set it in [defaults]"
                )
        own = _checked(
            {k: v for k, v in table.items() if k not in ("name", "schemas")},
            at,
            relay_keys,
            environ,
        )
        relay_defaults = {k: v for k, v in defaults.items() if k in relay_keys}
        merged = {**relay_defaults, **own, **cli_relay}
        if "database_url" not in merged:
            raise ConfigError(f"{at}: database_url: is required (here or in [defaults])")
        origins = [(own, at), (relay_defaults, defaults_at)]
        settings = _validated(RelaySettings, merged, origins, cli_relay)
        try:
            check_options(settings.publisher)
        except ConfigError as exc:
            raise ConfigError(_broker_error(str(exc), origins, cli_relay, at)) from None
        if schemas is not None:
            for key in ("slot_name", "publication"):
                if key in merged:
                    raise ConfigError(
                        f"{_origin(origins, cli_relay, key)}: {key}: would be shared by every "
                        "schema the glob finds (leave it out: each gets outbox_relay_<schema>)"
                    )
            outboxes.append(Outbox(name, settings, schemas))
            continue
        identity = database_of(settings.database_url)
        other = seen.setdefault((*identity, settings.schema_name), label)
        if other != label:
            raise ConfigError(
                f"{at}: schema: {other} already relays schema {settings.schema_name!r} of this "
                "database (one [[outbox]] table per schema)"
            )
        if settings.mode is Mode.CDC:
            # Replication slots are named per server, not per database.
            slot = (*identity[:2], settings.slot_name_or_default)
            other = slots.setdefault(slot, label)
            if other != label:
                raise ConfigError(
                    f"{at}: slot_name: {other} already uses slot "
                    f"{settings.slot_name_or_default!r} on this server (set slot_name and "
                    "publication)"
                )
        outboxes.append(Outbox(name, settings))
    observed = {k: v for k, v in defaults.items() if k in observability_keys}
    cli_observed = {k: v for k, v in given.items() if k in observability_keys}
    observed_settings = (
        _validated(
            ObservabilitySettings,
            {**observed, **cli_observed},
            [(observed, defaults_at)],
            cli_observed,
        )
        if observability
        else ObservabilitySettings()
    )
    return RelayConfig(path, outboxes, observed_settings)


def _flag() -> str:
    return f"--config ({env_name('config')})"


def _check_schemas(schemas: Any, table: Mapping[str, Any], at: str) -> None:
    if not isinstance(schemas, str) or not schemas.strip():
        raise ConfigError(f"{at}: schemas: must be a glob of schema names (e.g. 'tenant_*')")
    if "schema" in table or "schema_name" in table:
        raise ConfigError(f"{at}: schemas: give schema (one) or schemas (a glob), not both")


def _check_name(name: Any, at: str, places: Mapping[str, str]) -> None:
    if name is None:
        raise ConfigError(f"{at}: name: is required (it names the outbox in logs and metrics)")
    if not isinstance(name, str) or not RELAY_NAME.fullmatch(name):
        raise ConfigError(
            f"{at}: name: {name!r} must be 1-48 letters, digits, '.', '_' or '-' (e.g. orders)"
        )
    if name in places:
        raise ConfigError(f"{at}: name: {name!r} is taken by {places[name]}")


def _checked(
    table: Mapping[str, Any], at: str, known: set[str], environ: Mapping[str, str]
) -> dict[str, Any]:
    """The table's keys checked against ``known``, its ``${VAR}``s expanded."""
    checked: dict[str, Any] = {}
    for key, value in table.items():
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{at}: {key}: is not a setting{hint}")
        if isinstance(value, dict):
            raise ConfigError(f"{at}: {key}: must be a value, not a table")
        checked[key] = expand(value, environ, f"{at}: {key}")
    return checked


def _origin(
    origins: Sequence[tuple[Mapping[str, Any], str]], cli: Mapping[str, Any], key: str | None
) -> str:
    """Where ``key``'s value came from: "" for the command line, else the table."""
    if key is not None and key in cli:
        return ""
    for table, at in origins:
        if key is not None and key in table:
            return at
    return origins[0][1]


S = TypeVar("S", bound=Settings)


def _validated(
    model: type[S],
    values: Mapping[str, Any],
    origins: Sequence[tuple[Mapping[str, Any], str]],
    cli: Mapping[str, Any],
) -> S:
    """``model`` from ``values``; an error names the table (or the flag) its key came from."""
    try:
        return model.model_validate(dict(values))
    except InvalidSettingsError as exc:
        # Raised by the model that failed (a nested one too: RelaySettings.publisher).
        location = exc.error.errors(include_url=False)[0]["loc"]
        key = str(location[-1]) if location else None
        where = _origin(origins, cli, key)
        raise ConfigError(describe_error(exc.model, exc.error, where=where)) from None


_BROKER_FLAG = re.compile(r"--(?P<flag>[a-z0-9-]+)(?: \([A-Z0-9_]+\))?: ")


def _broker_error(
    text: str,
    origins: Sequence[tuple[Mapping[str, Any], str]],
    cli: Mapping[str, Any],
    at: str,
) -> str:
    """check_options names a broker option by its flag (as the CLI does): from the file, name
    it by its key and the table it is in."""
    match = _BROKER_FLAG.match(text)
    if match is None:
        return f"{at}: {text}"
    key = match["flag"].replace("-", "_")
    if key in cli:
        return text
    return f"{_origin(origins, cli, key)}: {key}: {text[match.end() :]}"


def database_of(url: str) -> tuple[str, str, str]:
    """(host, port, dbname) of a database URL: what says two outboxes share a database."""
    parameters = conninfo_to_dict(url)
    return (
        str(parameters.get("host") or "localhost"),
        str(parameters.get("port") or "5432"),
        str(parameters.get("dbname") or parameters.get("user") or ""),
    )
