"""``outbox-relay replay``: publish kept events again, in per-aggregate commit order.

Rows the relay sent and kept (``--on-sent keep``: ``published_at`` set) are read in id order,
which the outbox's insert trigger makes equal to commit order for every aggregate, and published
through the same :class:`~outbox_relay.publishers.base.Publisher` as the relay's, to the same or
another destination, each carrying the header ``outbox-replay: true``.

The :class:`Sequencer` keeps the order the way the relay's window does: an event goes out once
the previous event of its aggregate is confirmed, so many aggregates are on the wire at once (one
publish call carries every event whose turn has come). An event the broker refuses (a nack, an
unroutable return) is sent again, after a pause, before any later event of its aggregate; after
``--max-attempts`` the replay stops, those later events never sent.

Progress is the *position*: the highest id up to which every selected row is confirmed. It is
saved in ``outbox_replays`` as it advances (at least every page of ``--batch-size / 2`` rows
and every second), so a replay that is killed resends, when resumed, only what was on the wire
after it: at most about ``--batch-size`` events plus one page. Stopped by SIGINT or SIGTERM, it
reads no more rows, lets every event already read be confirmed, and saves the position: a resume
then sends nothing twice.

Never replayed: rows not yet sent (the relay's), rows above the highest id at the replay's start
(sent later, by the relay), and dead rows unless ``--include-dead``; the dead rows a selection
matches are counted and reported either way.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import json
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Protocol

from pydantic import AfterValidator, Field, model_validator

from outbox_relay.db.replays import ReplayRecord, ReplayStore, Selection, TypeCount, counts_total
from outbox_relay.errors import ConfigError
from outbox_relay.messages import (
    OutboxMessage,
    PublishResult,
    topic_pattern_problem,
    topic_regex,
)
from outbox_relay.publishers.base import PREFIXED_SCHEMES, OnResult, Publisher, PublisherSettings
from outbox_relay.redact import redact_url
from outbox_relay.settings import (
    DEFAULT_DATABASE_URL,
    Count,
    DatabaseUrl,
    Flag,
    Schema,
    Seconds,
    Settings,
    parse_duration,
    route,
)

log = logging.getLogger(__name__)

# The header every replayed message carries, on every broker (a string: NATS, MQTT and HTTP
# headers are text, so "true" reads the same everywhere).
REPLAY_HEADER = "outbox-replay"
REPLAY_HEADER_VALUE = "true"

# Seconds between saves of the position (besides one per page).
CHECKPOINT_EVERY = 1.0

REPLAY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
SELECTION_PANEL = "Selection"


# -- the selection ----------------------------------------------------------------------------


def parse_time(value: str, now: datetime) -> datetime:
    """An ISO 8601 timestamp (without a zone: UTC), or a duration before ``now`` (``2h``)."""
    text = value.strip()
    try:
        seconds = parse_duration(text)
    except ValueError:
        pass
    else:
        try:
            return now - timedelta(seconds=seconds)
        except OverflowError:
            raise ValueError(f"{value!r} reaches back before the year 1") from None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{value!r} is not a time: give an ISO 8601 timestamp (2026-12-05T10:00:00Z; UTC "
            "when it has no zone) or a duration before now (90s, 15m, 2h, 7d)"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def check_time(value: str | None) -> str | None:
    if value is not None:
        parse_time(value, datetime.now(UTC))
    return value


def check_patterns(patterns: list[str]) -> list[str]:
    for pattern in patterns:
        problem = topic_pattern_problem(pattern)
        if problem:
            raise ValueError(problem)
    return patterns


def check_texts(values: list[str]) -> list[str]:
    for value in values:
        if not value or "\x00" in value:
            raise ValueError(f"{value!r}: give a non-empty value without NUL characters")
    return values


def check_replay_name(name: str | None) -> str | None:
    if name is not None and not REPLAY_NAME.fullmatch(name):
        raise ValueError(
            f"{name!r} must be 1-63 letters, digits, '.', '_' or '-' (e.g. new-billing-consumer)"
        )
    return name


Time = Annotated[
    str | None,
    AfterValidator(check_time),
    Flag(metavar="TIME", env=False, panel=SELECTION_PANEL),
]
Values = Annotated[list[str], AfterValidator(check_texts)]


class ReplaySettings(Settings):
    """``outbox-relay replay``'s options. Broker settings (``broker_url``, ``exchange``, ...)
    may be given flat: they go into ``publisher``, as for ``serve``."""

    database_url: DatabaseUrl = DEFAULT_DATABASE_URL
    schema_name: Schema = "public"
    since: Annotated[
        Time,
        Field(
            description="Events created at or after this time: ISO 8601 (UTC without a zone) "
            "or a duration before now (2h, 7d)."
        ),
    ] = None
    until: Annotated[
        Time, Field(description="Events created before this time (same forms as --since).")
    ] = None
    event_type: Annotated[
        list[str],
        AfterValidator(check_patterns),
        Field(
            description="Event types matching this AMQP topic pattern (* one word, # any "
            "number: order.*, order.#); repeat for several."
        ),
        Flag(metavar="PATTERN", env=False, panel=SELECTION_PANEL),
    ] = Field(default_factory=list)
    aggregate_type: Annotated[
        Values,
        Field(description="Events of this aggregate type; repeat for several."),
        Flag(metavar="TYPE", env=False, panel=SELECTION_PANEL),
    ] = Field(default_factory=list)
    aggregate_id: Annotated[
        Values,
        Field(description="Events of this aggregate id; repeat for several."),
        Flag(metavar="ID", env=False, panel=SELECTION_PANEL),
    ] = Field(default_factory=list)
    include_dead: Annotated[
        bool,
        Field(
            description="Also publish dead events of the selection (they are skipped, and "
            "counted, otherwise)."
        ),
        Flag(env=False, panel=SELECTION_PANEL),
    ] = False
    all_events: Annotated[
        bool,
        Field(
            alias="all",
            description="Replay every kept event: needed when no selection option is given.",
        ),
        Flag(env=False, panel=SELECTION_PANEL),
    ] = False
    name: Annotated[
        str | None,
        AfterValidator(check_replay_name),
        Field(
            description="This replay's name, to resume it and in `replay list` [default: "
            "replay-<hash of the selection and destination>]."
        ),
        Flag(metavar="NAME", env=False),
    ] = None
    resume: Annotated[
        bool,
        Field(
            description="Continue an interrupted replay from its last confirmed position "
            "(its selection is the saved one)."
        ),
        Flag(env=False),
    ] = False
    dry_run: Annotated[
        bool,
        Field(description="Count what would be published, per event type; send nothing."),
        Flag(env=False),
    ] = False
    batch_size: Annotated[
        Count,
        Field(
            le=1_000_000,
            description="Most events in flight (read, not yet confirmed); a killed replay "
            "resumed sends at most about this many twice.",
        ),
    ] = 4000
    max_attempts: Annotated[
        Count,
        Field(description="Publishes of an event the broker refuses before the replay stops."),
    ] = 5
    retry_backoff: Annotated[
        Seconds,
        Field(
            description="Seconds before an event the broker refused is sent again; "
            "doubles per attempt."
        ),
    ] = 1.0
    publisher: Annotated[PublisherSettings, Flag(cli=False)] = Field(
        default_factory=PublisherSettings
    )

    @model_validator(mode="before")
    @classmethod
    def _broker_settings_go_into_publisher(cls, values: Any) -> Any:
        return route(values, cls, "publisher")

    @model_validator(mode="after")
    def _consistent(self) -> ReplaySettings:
        # Everything ever kept, to the live exchange, from a bare command: only when asked for.
        if not (self.selects_something() or self.all_events or self.resume or self.dry_run):
            raise ValueError(
                "replay: give a selection (--since, --until, --event-type, --aggregate-type, "
                "--aggregate-id) or --all to replay every kept event"
            )
        now = datetime.now(UTC)
        if self.since is not None and self.until is not None:
            since, until = parse_time(self.since, now), parse_time(self.until, now)
            if since >= until:
                raise ValueError(
                    f"--since {self.since} ({since.isoformat(timespec='seconds')}) is not before "
                    f"--until {self.until} ({until.isoformat(timespec='seconds')})"
                )
        return self

    def given_selection(self) -> dict[str, Any]:
        """The selection as typed (``2h`` stays ``2h``): what the default name is made of."""
        return {
            "since": self.since,
            "until": self.until,
            "event_type": list(self.event_type),
            "aggregate_type": list(self.aggregate_type),
            "aggregate_id": list(self.aggregate_id),
            "include_dead": self.include_dead,
        }

    def selects_something(self) -> bool:
        """Any selection option given (else a resume takes the saved selection)."""
        given = self.given_selection()
        return any(value for key, value in given.items() if key != "include_dead")

    def destination(self) -> str:
        """Where events go, without secrets: the broker and its exchange or prefix."""
        publisher = self.publisher
        where = redact_url(publisher.broker_url)
        if publisher.scheme in ("amqp", "amqps"):
            where += f" exchange {publisher.exchange}"
        elif publisher.scheme in PREFIXED_SCHEMES:
            where += f" prefix {publisher.topic_prefix}"
        return where

    def replay_name(self) -> str:
        if self.name is not None:
            return self.name
        key = json.dumps(
            {"selection": self.given_selection(), "destination": self.destination()},
            sort_keys=True,
        )
        return "replay-" + hashlib.sha256(key.encode()).hexdigest()[:10]


@dataclass(frozen=True, slots=True)
class Plan:
    """A replay about to run: its name, what it selects (resolved), and where it starts."""

    name: str
    selection: Selection
    given: dict[str, Any]
    include_dead: bool
    upper_id: int
    position: int
    replayed_before: int  # confirmed in earlier runs (a resume)
    dead_before: int
    resumed: bool


def resolve(given: dict[str, Any], now: datetime) -> Selection:
    """A typed selection (``given_selection()``) as the queries take it."""
    since, until = given.get("since"), given.get("until")
    return Selection(
        since=parse_time(since, now) if since else None,
        until=parse_time(until, now) if until else None,
        patterns=tuple(topic_regex(p) for p in given.get("event_type") or ()),
        aggregate_types=tuple(given.get("aggregate_type") or ()),
        aggregate_ids=tuple(given.get("aggregate_id") or ()),
    )


def saved_selection(given: dict[str, Any], selection: Selection) -> dict[str, Any]:
    """What ``outbox_replays.selection`` holds: as typed, and the times it resolved to."""
    return {
        "given": given,
        "since": selection.since.isoformat() if selection.since else None,
        "until": selection.until.isoformat() if selection.until else None,
    }


def selection_from_saved(saved: dict[str, Any]) -> Selection:
    given = saved.get("given") or {}
    resolved = resolve({**given, "since": None, "until": None}, datetime.now(UTC))
    since, until = saved.get("since"), saved.get("until")
    return Selection(
        since=datetime.fromisoformat(since) if since else None,
        until=datetime.fromisoformat(until) if until else None,
        patterns=resolved.patterns,
        aggregate_types=resolved.aggregate_types,
        aggregate_ids=resolved.aggregate_ids,
    )


NOTHING_KEPT = (
    "nothing to replay: schema {schema!r} keeps no sent events. The relay deletes each row once "
    "the broker confirms it (--on-sent delete, the default); run it with --on-sent keep (and "
    "--retention, default 7d) to keep sent events for replay"
)


async def prepare(settings: ReplaySettings, store: ReplayStore) -> Plan:
    """Decide what runs: a new replay, or the saved one to resume; refuse what cannot be right
    with one line (ConfigError: exit 3)."""
    name = settings.replay_name()
    record = await store.get(name)
    if settings.resume:
        return _resume_plan(settings, name, record)
    if record is not None and record.state != "done" and not settings.dry_run:
        raise ConfigError(
            f"replay {name!r} was {_state_words(record)} after {record.replayed} event(s): add "
            "--resume to continue it, or give another --name to start a new one"
        )
    given = settings.given_selection()
    return Plan(
        name=name,
        selection=resolve(given, datetime.now(UTC)),
        given=given,
        include_dead=settings.include_dead,
        upper_id=await store.upper_id(),
        position=0,
        replayed_before=0,
        dead_before=0,
        resumed=False,
    )


def _state_words(record: ReplayRecord) -> str:
    return {
        "running": "stopped without a goodbye (killed?)",
        "interrupted": "interrupted",
        "failed": "stopped by an error",
    }.get(record.state, record.state)


def _resume_plan(settings: ReplaySettings, name: str, record: ReplayRecord | None) -> Plan:
    if record is None:
        hint = "" if settings.name else " (give the --name it printed)"
        raise ConfigError(f"--resume: there is no replay {name!r} to resume{hint}")
    if record.state == "done":
        raise ConfigError(
            f"--resume: replay {name!r} is done ({record.replayed} event(s)); run it without "
            "--resume to replay its selection again"
        )
    given = record.selection.get("given") or {}
    if (settings.selects_something() or settings.include_dead) and (
        settings.given_selection() != given
    ):
        raise ConfigError(
            f"--resume: replay {name!r} selected {_describe_given(given)}; resume it with that "
            "selection (or with --name and no selection options)"
        )
    if record.destination != settings.destination():
        raise ConfigError(
            f"--resume: replay {name!r} publishes to {record.destination}, not "
            f"{settings.destination()}; give the same broker options"
        )
    return Plan(
        name=name,
        selection=selection_from_saved(record.selection),
        given=given,
        include_dead=bool(given.get("include_dead")),
        upper_id=record.upper_id,
        position=record.position,
        replayed_before=record.replayed,
        dead_before=record.dead_skipped,
        resumed=True,
    )


def _describe_given(given: dict[str, Any]) -> str:
    parts = [
        f"--{key.replace('_', '-')} {item}"
        for key, value in given.items()
        if key != "include_dead"
        for item in (value if isinstance(value, list) else [value] if value else [])
    ]
    if given.get("include_dead"):
        parts.append("--include-dead")
    return " ".join(parts) or "every kept event"


# -- sending in order -------------------------------------------------------------------------


Publish = Callable[[Sequence[OutboxMessage], OnResult], Awaitable[Sequence[PublishResult]]]


@dataclass(slots=True, eq=False)
class _Entry:
    message: OutboxMessage
    attempts: int = 0
    confirmed: bool = False
    retry: asyncio.TimerHandle | None = None  # waiting to be sent again


@dataclass(frozen=True, slots=True)
class Refused:
    """An event the replay could not publish: it stopped there."""

    message: OutboxMessage
    reason: str
    attempts: int


class Sequencer:
    """Publishes events added in id order, each once the previous event of its aggregate is
    confirmed; see the module docstring. ``position`` is the highest id up to which everything
    added is confirmed."""

    def __init__(
        self,
        publish: Publish,
        *,
        position: int = 0,
        max_attempts: int = 5,
        retry_backoff: float = 1.0,
        check: Callable[[OutboxMessage], str | None] = lambda _m: None,
    ) -> None:
        self._publish = publish
        self._max_attempts = max_attempts
        self._retry_backoff = retry_backoff
        self._check = check
        self.position = position
        self.passed = 0  # entries the position has passed
        self.confirmed = 0  # confirms received
        self.refused: Refused | None = None
        self.error: BaseException | None = None
        self._chains: dict[str, deque[_Entry]] = {}
        self._order: deque[_Entry] = deque()
        self._ready: list[_Entry] = []
        self._on_wire = 0
        self._halted = False
        self._flush_scheduled = False
        self._waves: set[asyncio.Task[None]] = set()
        self._retrying: set[_Entry] = set()
        self._changed = asyncio.Event()

    @property
    def outstanding(self) -> int:
        """Events added and not yet confirmed (waiting, on the wire, or backing off)."""
        return len(self._order)

    @property
    def on_wire(self) -> int:
        return self._on_wire

    def watch(self) -> None:
        """Call before looking at the state, then wait with changed()."""
        self._changed.clear()

    async def changed(self) -> None:
        await self._changed.wait()

    def add(self, messages: Sequence[OutboxMessage]) -> None:
        """Queue ``messages`` (in id order, above everything added before)."""
        for message in messages:
            entry = _Entry(message)
            self._order.append(entry)
            key = message.aggregate_id
            if key is None:
                self._go(entry)
                continue
            chain = self._chains.get(key)
            if chain is None:
                self._chains[key] = deque([entry])
                self._go(entry)
            else:
                chain.append(entry)

    def halt(self) -> None:
        """Send nothing more (what is on the wire is still answered)."""
        self._halted = True
        self._ready.clear()
        for entry in self._retrying:
            if entry.retry is not None:
                entry.retry.cancel()
        self._retrying.clear()

    async def close(self) -> None:
        self.halt()
        waves = list(self._waves)
        for task in waves:
            task.cancel()
        await asyncio.gather(*waves, return_exceptions=True)

    # -- internals ---------------------------------------------------------------------------

    def _go(self, entry: _Entry) -> None:
        if self._halted:
            return
        problem = entry.message.problem or self._check(entry.message)
        if problem is not None:
            self._refuse(entry, problem)
            return
        self._ready.append(entry)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._halted or not self._ready:
            return
        wave, self._ready = self._ready, []
        self._on_wire += len(wave)
        task = asyncio.ensure_future(self._send(wave))
        self._waves.add(task)
        task.add_done_callback(self._waves.discard)

    async def _send(self, wave: list[_Entry]) -> None:
        answered = [False] * len(wave)

        def on_result(index: int, result: PublishResult) -> None:
            if answered[index]:
                return
            answered[index] = True
            self._on_wire -= 1
            try:
                self._resolve(wave[index], result)
            except Exception as exc:  # called from the client library: never lose it
                self._fail(exc)

        try:
            results = await self._publish([entry.message for entry in wave], on_result)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._on_wire -= answered.count(False)
            self._fail(exc)
            return
        for index, result in enumerate(results):
            on_result(index, result)

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.halt()
        self._changed.set()

    def _resolve(self, entry: _Entry, result: PublishResult) -> None:
        message = entry.message
        entry.attempts += 1
        if result.confirmed:
            entry.confirmed = True
            self.confirmed += 1
            key = message.aggregate_id
            if key is not None:
                chain = self._chains[key]
                chain.popleft()
                if chain:
                    self._go(chain[0])
                else:
                    del self._chains[key]
            order = self._order
            while order and order[0].confirmed:
                self.position = order.popleft().message.id
                self.passed += 1
        else:
            reason = result.reason or "not confirmed"
            if result.permanent or entry.attempts >= self._max_attempts:
                self._refuse(entry, reason)
            elif not self._halted:
                # Sent again before any later event of its aggregate: they wait in its chain.
                delay = self._retry_backoff * 2 ** (entry.attempts - 1)
                log.warning(
                    "broker refused a replayed event, sending it again in %.1fs: %s",
                    delay,
                    reason,
                    extra={"event_id": message.event_id, "attempt": entry.attempts},
                )
                entry.retry = asyncio.get_running_loop().call_later(delay, self._retry, entry)
                self._retrying.add(entry)
        self._changed.set()

    def _retry(self, entry: _Entry) -> None:
        self._retrying.discard(entry)
        entry.retry = None
        self._go(entry)

    def _refuse(self, entry: _Entry, reason: str) -> None:
        if self.refused is None:
            self.refused = Refused(entry.message, reason, entry.attempts)
        self.halt()
        self._changed.set()


# -- running a replay -------------------------------------------------------------------------


class State(enum.StrEnum):
    DONE = "done"
    INTERRUPTED = "interrupted"
    FAILED = "failed"


class ReplayProgress(Protocol):
    """What the CLI shows while a replay runs."""

    def started(self, name: str, total: int) -> None: ...

    def advanced(self, confirmed: int) -> None: ...


@dataclass(slots=True)
class Outcome:
    """What a replay did (or, with --dry-run, would do)."""

    name: str
    counts: list[TypeCount]
    include_dead: bool
    state: State = State.DONE
    replayed: int = 0  # confirmed in this run
    seconds: float = 0.0
    position: int = 0
    resumed: bool = False
    error: str | None = None
    refused: Refused | None = None
    kept_range: tuple[datetime | None, datetime | None] = (None, None)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Events the selection sends (kept, plus dead with --include-dead)."""
        kept, dead = counts_total(self.counts)
        return kept + (dead if self.include_dead else 0)

    @property
    def dead_matched(self) -> int:
        return counts_total(self.counts)[1]

    @property
    def dead_skipped(self) -> int:
        return 0 if self.include_dead else self.dead_matched

    def summary(self) -> str:
        dead = f"{self.dead_skipped} dead skipped"
        if self.include_dead and self.dead_matched:
            dead = f"{self.dead_matched} dead included"
        return f"replayed {self.replayed} events ({dead}) in {self.seconds:.1f} s"


def stamped(message: OutboxMessage) -> OutboxMessage:
    """The message with the replay header added to its own headers."""
    return message.with_headers({**message.headers, REPLAY_HEADER: REPLAY_HEADER_VALUE})


async def count(settings: ReplaySettings, store: ReplayStore) -> tuple[Plan, Outcome]:
    """What the replay would send (``--dry-run``, and the total a real run shows)."""
    plan = await prepare(settings, store)
    counts = await store.count(plan.selection, plan.position, plan.upper_id)
    outcome = Outcome(
        plan.name,
        counts,
        plan.include_dead,
        position=plan.position,
        resumed=plan.resumed,
        kept_range=await store.kept_range(),
    )
    if outcome.kept_range == (None, None) and not (plan.include_dead and outcome.dead_matched):
        raise ConfigError(NOTHING_KEPT.format(schema=settings.schema_name))
    return plan, outcome


async def run_replay(
    settings: ReplaySettings,
    store: ReplayStore,
    publisher: Publisher,
    *,
    stop: asyncio.Event,
    abort: asyncio.Event,
    progress: ReplayProgress | None = None,
) -> Outcome:
    """Replay until done, refused, or ``stop`` (finish what was read) or ``abort`` (now)."""
    started = time.monotonic()
    plan, outcome = await count(settings, store)
    if outcome.total == 0:
        if plan.resumed and await store.lock(plan.name):
            # Killed after its last confirm, before it could say so.
            await store.finish(
                plan.name,
                position=plan.upper_id,
                replayed=plan.replayed_before,
                dead_skipped=plan.dead_before,
                state=str(State.DONE),
            )
        outcome.seconds = time.monotonic() - started
        return outcome
    if not await store.lock(plan.name):
        raise ConfigError(f"replay {plan.name!r} is running in another process")
    # Connected before anything is recorded: a broker that cannot be reached leaves no trace.
    await publisher.connect()
    if plan.resumed:
        await store.resume(plan.name)
    else:
        await store.start(
            plan.name,
            saved_selection(plan.given, plan.selection),
            settings.destination(),
            plan.upper_id,
        )
    dead_total = plan.dead_before if plan.resumed else outcome.dead_skipped
    if progress is not None:
        progress.started(plan.name, outcome.total)

    def check(message: OutboxMessage) -> str | None:
        limit = publisher.max_message_bytes
        size = message.size or len(message.payload)
        if size > limit:
            return f"message of {size} bytes exceeds the {limit}-byte limit"
        return publisher.message_problem(message)

    sequencer = Sequencer(
        publisher.publish_batch,
        position=plan.position,
        max_attempts=settings.max_attempts,
        retry_backoff=settings.retry_backoff,
        check=check,
    )
    page_size = max(1, settings.batch_size // 2)
    after = plan.position
    exhausted = False
    fetch: asyncio.Task[list[tuple[OutboxMessage, bool]]] | None = None
    saved = (plan.position, 0, time.monotonic())  # position, passed, when

    async def save() -> None:
        nonlocal saved
        position, passed, when = saved
        if sequencer.position > position and (
            time.monotonic() - when >= CHECKPOINT_EVERY or sequencer.passed - passed >= page_size
        ):
            await store.checkpoint(
                plan.name, sequencer.position, plan.replayed_before + sequencer.passed, dead_total
            )
            saved = (sequencer.position, sequencer.passed, time.monotonic())

    try:
        while True:
            if abort.is_set() or sequencer.error is not None:
                break
            is_refused = sequencer.refused is not None
            # Refused: nothing more is sent; the answers on the wire still move the position.
            if is_refused and sequencer.on_wire == 0:
                break
            stopping = stop.is_set() or is_refused
            room = settings.batch_size - sequencer.outstanding
            if fetch is None and not exhausted and not stopping and room >= page_size:
                fetch = asyncio.ensure_future(
                    store.page(
                        plan.selection,
                        after,
                        plan.upper_id,
                        page_size,
                        include_dead=plan.include_dead,
                    )
                )
            if fetch is not None and fetch.done():
                rows, fetch = fetch.result(), None
                if stopping:
                    continue  # read after the stop: never sent
                exhausted = len(rows) < page_size
                if rows:
                    after = rows[-1][0].id
                    sequencer.add([stamped(message) for message, _dead in rows])
                continue
            if sequencer.outstanding == 0 and fetch is None and (exhausted or stopping):
                break
            await save()
            if progress is not None:
                progress.advanced(sequencer.confirmed)
            sequencer.watch()
            waits: list[Awaitable[Any]] = [sequencer.changed(), stop.wait(), abort.wait()]
            if fetch is not None:
                waits.append(fetch)
            await _first(waits, CHECKPOINT_EVERY)
    finally:
        if fetch is not None:
            fetch.cancel()
            await asyncio.gather(fetch, return_exceptions=True)
        await sequencer.close()
    if progress is not None:
        progress.advanced(sequencer.confirmed)
    outcome.replayed = sequencer.confirmed
    outcome.seconds = time.monotonic() - started
    done = sequencer.outstanding == 0 and exhausted and sequencer.refused is None
    if sequencer.refused is not None:
        refused = sequencer.refused
        outcome.state, outcome.refused = State.FAILED, refused
        outcome.error = (
            f"the broker refused event {refused.message.event_id} ({refused.message.event_type}, "
            f"aggregate {refused.message.aggregate_id}) after {refused.attempts} attempt(s): "
            f"{refused.reason}"
        )
    elif sequencer.error is not None:
        outcome.state, outcome.error = State.FAILED, str(sequencer.error) or repr(sequencer.error)
    elif done:
        outcome.state = State.DONE
    else:
        outcome.state = State.INTERRUPTED
    outcome.position = plan.upper_id if outcome.state is State.DONE else sequencer.position
    await store.finish(
        plan.name,
        position=outcome.position,
        replayed=plan.replayed_before + sequencer.passed,
        dead_skipped=dead_total,
        state=str(outcome.state),
        last_error=outcome.error,
    )
    return outcome


async def _first(waits: Sequence[Awaitable[Any]], seconds: float) -> None:
    """Wait until one of ``waits`` completes (or ``seconds`` pass); cancel the waits made here."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task, wait in zip(tasks, waits, strict=True):
            # A fetch is the caller's task: left running. Waits made here are cancelled.
            if task is not wait:
                task.cancel()
