"""Which environment variables each ``outbox-relay`` command reads, for checking deploy files.

A manifest that sets ``OUTBOX_RELAY_BATCHSIZE`` (a typo) would be silently ignored by the relay;
the deployment tests compare every variable a compose file, manifest, chart or unit sets with
the variables of the command that container runs.
"""

from __future__ import annotations

from typing import Any

import opentelemetry.environment_variables as otel_api_env
import opentelemetry.sdk.environment_variables as otel_sdk_env
import typer.main

from outbox_relay.cli import app

# Standard OpenTelemetry variables: read by the SDK and exporters the relay configures.
OTEL_VARIABLES = frozenset(
    value
    for module in (otel_api_env, otel_sdk_env)
    for name, value in vars(module).items()
    if name.startswith("OTEL_") and isinstance(value, str)
)


def _command(path: tuple[str, ...]) -> Any:
    command: Any = typer.main.get_command(app)
    for name in path:
        assert hasattr(command, "commands"), f"{command.name} has no subcommands"
        sub = command.commands.get(name)
        assert sub is not None, f"outbox-relay has no command {' '.join(path)!r}"
        command = sub
    return command


def command_variables(*path: str) -> frozenset[str]:
    """The OUTBOX_RELAY_* variables ``outbox-relay <path...>`` reads (its options' envvars)."""
    names: set[str] = set()
    for param in _command(tuple(path)).params:
        envvar = getattr(param, "envvar", None)
        if isinstance(envvar, str):
            names.add(envvar)
        elif envvar:
            names.update(envvar)
    return frozenset(names)


def unknown_variables(args: list[str], env: set[str] | frozenset[str]) -> set[str]:
    """Variables in ``env`` that ``outbox-relay <args...>`` does not read (OTEL_* are allowed).

    ``args`` is the container's command line after the entrypoint, e.g. ``["serve"]`` or
    ``["migrate", "--grants"]``; options (``--...``) are skipped to find the subcommand.
    """
    path = tuple(arg for arg in args if not arg.startswith("-"))
    known = command_variables(*_subcommand_path(path)) | OTEL_VARIABLES
    return {name for name in env if name not in known}


def _subcommand_path(words: tuple[str, ...]) -> tuple[str, ...]:
    """The longest prefix of ``words`` that names a command (drops positional arguments)."""
    # Typer vendors its own click: groups are recognised by their ``commands`` mapping.
    command: Any = typer.main.get_command(app)
    path: list[str] = []
    for word in words:
        if word not in getattr(command, "commands", {}):
            break
        command = command.commands[word]
        path.append(word)
    assert path, f"no outbox-relay command in {list(words)!r}"
    return tuple(path)
