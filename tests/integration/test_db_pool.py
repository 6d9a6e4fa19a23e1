"""The connections one process shares among the outboxes of a database (db/pool.py), against
the real PostgreSQL: a bounded pool served first come first served, a reset that replaces every
connection of a dead link, heartbeat rounds in one round trip where one failing statement spoils
only its own result, and one LISTEN connection ringing each channel's subscribers only."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from outbox_relay.db.pool import ConnectionPool, Coordinator, Listener
from outbox_relay.errors import OutboxRelayError


async def pid_of(conn: psycopg.AsyncConnection[Any]) -> int:
    return conn.info.backend_pid


def test_waiters_are_served_first_come_first_served_within_the_budget(database_url: str) -> None:
    async def scenario() -> list[str]:
        pool = ConnectionPool(database_url, 2, "outbox-relay:pool-test")
        served: list[str] = []
        try:
            first, second = await pool.acquire(), await pool.acquire()

            async def client(name: str) -> None:
                conn = await pool.acquire()
                served.append(name)
                await asyncio.sleep(0.01)
                await conn.execute("SELECT 1")
                await conn.commit()
                pool.release(conn)

            # Five more want one while both are taken: they queue in the order they asked
            clients = []
            for name in "abcde":
                clients.append(asyncio.ensure_future(client(name)))
                await asyncio.sleep(0.01)
            assert served == []
            assert len(pool.pids()) == 2  # the budget: nobody opened a third
            pool.release(first)
            pool.release(second)
            await asyncio.gather(*clients)
            assert len(pool.pids()) == 2
        finally:
            await pool.close()
        return served

    assert asyncio.run(scenario()) == list("abcde")


def test_a_reset_replaces_idle_connections_now_and_busy_ones_when_given_back(
    database_url: str,
) -> None:
    async def scenario() -> None:
        pool = ConnectionPool(database_url, 3, "outbox-relay:pool-test")
        try:
            idle, busy = await pool.acquire(), await pool.acquire()
            old = {await pid_of(idle), await pid_of(busy)}
            pool.release(idle)
            await busy.execute("SELECT 1")  # a transaction open: in use

            pool.reset()  # the link was found dead
            await busy.rollback()
            pool.release(busy)
            fresh = [await pool.acquire(), await pool.acquire()]
            assert not old & {await pid_of(conn) for conn in fresh}
            for conn in fresh:
                pool.release(conn)
        finally:
            await pool.close()

    asyncio.run(scenario())


def test_a_cancelled_waiter_gives_its_place_to_the_next(database_url: str) -> None:
    async def scenario() -> None:
        pool = ConnectionPool(database_url, 1, "outbox-relay:pool-test")
        try:
            held = await pool.acquire()
            gone = asyncio.ensure_future(pool.acquire())
            nxt = asyncio.ensure_future(pool.acquire())
            await asyncio.sleep(0.01)
            gone.cancel()
            pool.release(held)
            conn = await asyncio.wait_for(nxt, timeout=5)
            assert conn is held
            pool.release(conn)
        finally:
            await pool.close()

    asyncio.run(scenario())


def test_heartbeats_share_one_round_and_a_failing_statement_spoils_only_its_own(
    database_url: str,
) -> None:
    async def scenario() -> None:
        coordinator = Coordinator(database_url, "outbox-relay:coordinator-test")
        try:
            await coordinator.open()
            beats = [
                asyncio.ensure_future(coordinator.beat(statement, 0.05))
                for statement in (
                    "SELECT 1, pg_backend_pid()",
                    "SELECT * FROM no_such_table_for_the_round",
                    "SELECT 3, pg_backend_pid()",
                )
            ]
            await asyncio.wait(beats)
            one, three = beats[0].result(), beats[2].result()
            assert one is not None
            assert three is not None
            assert (one[0], three[0]) == (1, 3)
            assert one[1] == three[1]  # on the one connection
            with pytest.raises(OutboxRelayError, match="no_such_table_for_the_round"):
                beats[1].result()
        finally:
            await coordinator.close()

    asyncio.run(scenario())


def test_one_listen_connection_rings_each_channels_subscribers_only(database_url: str) -> None:
    async def scenario() -> None:
        listener = Listener(database_url, "outbox-relay:listen-test")
        try:
            await listener.open()
            orders = await listener.subscribe("pool_test.orders")
            billing = await listener.subscribe("pool_test.billing")
            async with await psycopg.AsyncConnection.connect(
                database_url, autocommit=True
            ) as writer:
                await writer.execute('NOTIFY "pool_test.orders"')
            assert await orders.wait(5)
            assert not await billing.wait(0.3)
        finally:
            await listener.close()

    asyncio.run(scenario())
