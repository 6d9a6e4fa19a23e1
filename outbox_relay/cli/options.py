"""CLI options generated from the settings declarations (``outbox_relay.settings``).

A command declares which :class:`~outbox_relay.settings.Settings` models it takes; every field
becomes a Typer option (flag, ``OUTBOX_RELAY_*`` variable, help, default shown) or argument. The
command receives the values that were given explicitly, on the command line or in the
environment, still as text: the models validate them, so the CLI, a config file and code share
one set of rules and one kind of error message.
"""

from __future__ import annotations

import enum
import functools
import inspect
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Annotated, Any, Union, get_args, get_origin

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from outbox_relay.settings import Flag, Settings, env_name, flag_of, key_of, option_name

Values = Mapping[str, Any]


def cli_fields(model: type[BaseModel]) -> Iterator[tuple[str, FieldInfo]]:
    """(key, field) for each field of ``model`` that is a CLI option or argument."""
    for name, info in model.model_fields.items():
        if flag_of(info).cli:
            yield key_of(name, info), info


def _bare(annotation: Any) -> Any:
    """``int | None`` -> int; ``Annotated[float, ...]`` -> float."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return _bare(members[0])
    return annotation


def _metavar(kind: Any, info: FieldInfo) -> str | None:
    flag = flag_of(info)
    if flag.metavar:
        return flag.metavar
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return "|".join(str(member.value) for member in kind)
    if kind is int:
        return "INTEGER"
    if kind is float:
        return "NUMBER"
    return "TEXT"


def _shown_default(info: FieldInfo) -> Any:
    default = info.get_default(call_default_factory=False)
    if isinstance(default, enum.Enum):
        return default.value
    if isinstance(default, float) and default.is_integer():
        return int(default)
    return default


def parameter(key: str, info: FieldInfo) -> inspect.Parameter:
    flag = flag_of(info)
    kind = _bare(info.annotation)
    help_text = info.description or ""
    is_list = get_origin(kind) in (list, tuple, typing.Sequence)
    default = None if info.is_required() else _shown_default(info)
    if flag.argument:
        annotation: Any = Annotated[
            list[str] | None if is_list else str | None,
            typer.Argument(help=help_text, show_default=False, metavar=flag.metavar),
        ]
        return inspect.Parameter(
            key, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation
        )
    decls = [flag.decl or option_name(key, info)]
    common: dict[str, Any] = {
        "help": help_text,
        "envvar": env_name(key) if flag.env else None,
        "rich_help_panel": flag.panel,
    }
    if kind is bool:
        option = typer.Option(*decls, **common, show_default=True)
        return inspect.Parameter(
            key,
            inspect.Parameter.KEYWORD_ONLY,
            default=bool(default),
            annotation=Annotated[bool, option],
        )
    empty = default is None or is_list or default == "" or default is PydanticUndefined
    shown = None if flag.secret or empty else _display(default, flag)
    option = typer.Option(*decls, **common, metavar=_metavar(kind, info), show_default=True)
    annotation = Annotated[list[str] | None if is_list else str | None, option]
    # The default is shown in --help; explicit() passes on only what was given.
    return inspect.Parameter(
        key, inspect.Parameter.KEYWORD_ONLY, default=shown, annotation=annotation
    )


def _display(default: Any, flag: Flag) -> str:
    """A default as a user would type it: 7d rather than 604800."""
    if flag.metavar == "DURATION" and isinstance(default, int | float):
        for unit, seconds in (("d", 86400), ("h", 3600), ("m", 60)):
            if default >= seconds and default % seconds == 0:
                return f"{int(default // seconds)}{unit}"
        return f"{default:g}s"
    return str(default)


def explicit(ctx: typer.Context, values: Mapping[str, Any]) -> dict[str, Any]:
    """The values given on the command line or in the environment (not the defaults)."""
    given: dict[str, Any] = {}
    for key, value in values.items():
        source = ctx.get_parameter_source(key)
        if source is not None and source.name in _GIVEN and value is not None:
            given[key] = value
    return given


_GIVEN = frozenset({"COMMANDLINE", "ENVIRONMENT"})


def settings_command(
    *models: type[Settings],
) -> Callable[[Callable[[Values], None]], Callable[..., None]]:
    """Turn ``fn(values)`` into a Typer command with one option per field of ``models``.

    ``values`` holds the options given explicitly (key -> text, bool or list of text); build the
    settings with ``Model.from_mapping(pick(values, Model))``."""

    def decorate(fn: Callable[[Values], None]) -> Callable[..., None]:
        seen: dict[str, inspect.Parameter] = {}
        for model in models:
            for key, info in cli_fields(model):
                seen.setdefault(key, parameter(key, info))
        ctx_param = inspect.Parameter(
            "ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context
        )

        @functools.wraps(fn)
        def command(ctx: typer.Context, **given: Any) -> None:
            # A group that is a command too (replay) does nothing when a subcommand of it runs
            # (replay list).
            if ctx.invoked_subcommand is not None:
                return
            fn(explicit(ctx, given))

        del command.__wrapped__  # Typer must read the generated signature, not fn's
        command.__signature__ = inspect.Signature([ctx_param, *seen.values()])  # type: ignore[attr-defined]
        command.__annotations__ = {}
        # Which settings the command reads (tests cover every option of every command from it).
        command.settings_models = models  # type: ignore[attr-defined]
        return command

    return decorate


def pick(values: Values, *models: type[BaseModel]) -> dict[str, Any]:
    """The values that are settings of ``models`` (their keys: field names or aliases)."""
    keys: set[str] = set()
    for model in models:
        for name, info in model.model_fields.items():
            keys.update({name, key_of(name, info)})
    return {key: value for key, value in values.items() if key in keys}


def settings_models(command: Callable[..., Any]) -> tuple[type[Settings], ...]:
    """The settings models a command made by :func:`settings_command` reads (also through the
    wrappers Typer and click put around it); empty for any other command."""
    seen: Callable[..., Any] | None = command
    while seen is not None:
        models: tuple[type[Settings], ...] | None = getattr(seen, "settings_models", None)
        if models is not None:
            return models
        seen = getattr(seen, "__wrapped__", None)
    return ()
