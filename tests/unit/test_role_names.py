"""Role names `migrate --grants` accepts: any real role name, never a reserved one."""

from __future__ import annotations

import pytest

from outbox_relay.db.grants import check_role_name
from outbox_relay.errors import ConfigError


@pytest.mark.parametrize("name", ["outbox_relay", "Orders-Relay", "svc.orders", "x" * 63])
def test_ordinary_names_are_accepted(name: str) -> None:
    assert check_role_name("--relay-role", name) == name


@pytest.mark.parametrize(
    "name", ["", "public", "PUBLIC", "none", "current_user", "pg_monitor", "x" * 64]
)
def test_reserved_or_impossible_names_name_the_option(name: str) -> None:
    with pytest.raises(ConfigError, match="--relay-role"):
        check_role_name("--relay-role", name)
