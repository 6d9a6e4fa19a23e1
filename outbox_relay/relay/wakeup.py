"""LISTEN/NOTIFY wake-ups on a connection of their own, with a timeout as the polling fallback."""

from __future__ import annotations

import contextlib
from typing import Any

import psycopg
from psycopg import sql

from outbox_relay.db.connect import connect_async, translate_errors_async
from outbox_relay.db.queries import schemaless_query
from outbox_relay.errors import DatabaseUnavailableError
from outbox_relay.redact import redact_url


class Waker:
    def __init__(self, database_url: str, channel: str, application_name: str) -> None:
        self._url = database_url
        self._channel = channel
        self._application_name = application_name
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def connect(self) -> None:
        async with translate_errors_async(redact_url(self._url)):
            self._conn = await connect_async(
                self._url, autocommit=True, application_name=f"{self._application_name}:listen"
            )
            listen = schemaless_query("listen").format(channel=sql.Identifier(self._channel))
            await self._conn.execute(listen)

    async def wait(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for a notification; True when one arrived."""
        conn = self._conn
        if conn is None or conn.closed:
            raise DatabaseUnavailableError("the LISTEN connection is closed")
        async with translate_errors_async(redact_url(self._url)):
            async for _ in conn.notifies(timeout=seconds, stop_after=1):
                return True
        return False

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            with contextlib.suppress(psycopg.Error):
                await conn.close()
