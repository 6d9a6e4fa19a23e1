"""Storage that stays bounded at volume (docs/retention.md).

Measured first (bench/outbox_soak.py, README "Outbox soak"): every sent event is a dead row
version in the outbox, thousands a second, and where vacuum lags (autovacuum off, or throttled
and visiting each database once a minute) the table, its indexes and every claim grow with them.
So the outbox is kept a small queue in both --on-sent modes, PgQ-style:

* sent events leave it in the transaction that settles them: deleted (``delete``), or moved to
  ``outbox_sent`` (``keep``), a table partitioned by the time they were sent. Retention drops
  whole partitions, which leaves no dead rows anywhere; the relay creates them ahead of time.
* the relay vacuums the outbox itself whenever dead rows pile up (relay/upkeep.py), when its role
  may (owner or superuser); autovacuum's settings for it come with migration 0006.

This module holds the policy (how wide the partitions, how far ahead) and what the relays of one
outbox in this process share: how far ahead partitions are known to exist.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

# Partition widths in seconds, from a minute to a day: the widest at most a tenth of the
# retention, so at most about a tenth more than --retention is kept at any time.
WIDTHS = (60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
PARTITIONS_PER_RETENTION = 10
# Partitions exist at least this far ahead, so settling never waits on creating one; relays that
# were down longer than this create the missing ones before their first settle.
AHEAD_AT_LEAST = 900.0
# A settle covers partitions itself when fewer seconds than this are left before the horizon
# (the upkeep pass normally extends it long before): server and relay clocks may differ a bit.
SETTLE_MARGIN = 120.0


@dataclass(frozen=True, slots=True)
class ArchivePolicy:
    """How kept events are partitioned for a --retention of ``retention`` seconds."""

    retention: float
    width: float
    ahead: float

    @classmethod
    def for_retention(cls, retention: float) -> ArchivePolicy:
        target = retention / PARTITIONS_PER_RETENTION
        width = max((w for w in WIDTHS if w <= target), default=WIDTHS[0])
        return cls(retention=retention, width=float(width), ahead=max(2.0 * width, AHEAD_AT_LEAST))

    def parameters(self) -> dict[str, float]:
        return {"retention": self.retention, "width": self.width, "ahead": self.ahead}


class SentArchive:
    """The partitions of one outbox's ``outbox_sent`` as this process knows them: they exist up
    to ``covered_until`` (seconds since the epoch, the server's clock)."""

    def __init__(self, policy: ArchivePolicy) -> None:
        self.policy = policy
        self.covered_until = 0.0  # unknown until a cover: the first settle covers

    def needs_cover(self) -> bool:
        return time.time() + SETTLE_MARGIN >= self.covered_until

    def covered(self, until: float) -> None:
        self.covered_until = until

    def forget(self) -> None:
        """A settle failed: partitions may be missing (dropped by hand, a restored database), so
        the next settle covers first."""
        self.covered_until = 0.0
