"""The claim walks the pending index in id order and stops at its limit when the relay's partitions
hold a good share of the backlog (one, two or four relays): a plan that sorted the whole backlog
made each claim of a 100,000-row backlog take 100-200 ms instead of a few. (With a small share,
reading every pending row and sorting its own few is the cheaper plan, and the planner takes it.)"""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest
from psycopg import sql

from outbox_relay.db.queries import Queries
from outbox_relay.db.store import Share

pytestmark = pytest.mark.integration

BACKLOG = 50_000


def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes.extend(plan_nodes(child))
    return nodes


@pytest.mark.parametrize("held", [64, 32, 16])
def test_a_claim_reads_the_pending_index_in_order_without_sorting_the_backlog(
    database_url: str, held: int
) -> None:
    share = Share(relay="planner", partitions=tuple(range(held)), count=64)
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO outbox (event_type, aggregate_id, payload)"
            " SELECT 'order.created', 'agg-' || g, '{}' FROM generate_series(1, %s) g",
            (BACKLOG,),
        )
        conn.execute(
            "UPDATE outbox_relay_leases SET relay = %s, expires_at = now() + interval '1 hour'"
            " WHERE scope = 'partition' AND partition = ANY(%s)",
            (share.relay, list(share.partitions)),
        )
        conn.commit()
        conn.execute("ANALYZE outbox")
        explain = sql.SQL("EXPLAIN (FORMAT JSON) ") + Queries("public")["claim"]
        params = {"limit": 1333, "in_flight": list(range(1, 3000)), **share.parameters()}
        row = conn.execute(explain, params, prepare=False).fetchone()
        assert row is not None
        plan = row[0] if isinstance(row[0], list) else json.loads(row[0])
        claimed = conn.execute(Queries("public")["claim"], params, prepare=False).fetchall()
    nodes = plan_nodes(plan[0]["Plan"])
    kinds = [node["Node Type"] for node in nodes]
    assert "Sort" not in kinds, kinds
    assert any(
        node.get("Index Name") == "outbox_pending_v1" and node["Node Type"] == "Index Scan"
        for node in nodes
    ), kinds
    assert claimed, "the claim found nothing"
    assert [row[0] for row in claimed] == sorted(row[0] for row in claimed)
