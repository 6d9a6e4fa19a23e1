"""Log formatters: one line per record, structured context from ``extra=``, nothing else."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator

import pytest

from outbox_relay.observability.logs import JsonFormatter, TextFormatter, configure


def record(
    msg: str = "publish failed: %s", args: tuple[object, ...] = ("unroutable",), **extra: object
) -> logging.LogRecord:
    logger = logging.getLogger("outbox_relay.relay.loop")
    return logger.makeRecord(
        logger.name, logging.WARNING, __file__, 1, msg, args, None, extra=extra
    )


def test_json_line_has_the_message_and_every_extra() -> None:
    line = JsonFormatter().format(
        record(event_id="e-1", event_type="order.created", attempt=2, permanent=False)
    )
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "publish failed: unroutable"
    assert entry["level"] == "warning"
    assert entry["logger"] == "outbox_relay.relay.loop"
    assert entry["ts"].endswith("+00:00")
    assert entry["event_id"] == "e-1"
    assert entry["event_type"] == "order.created"
    assert entry["attempt"] == 2
    assert entry["permanent"] is False


def test_json_line_carries_no_logrecord_internals() -> None:
    entry = json.loads(JsonFormatter().format(record(batch_size=10)))
    assert set(entry) == {"ts", "level", "logger", "message", "batch_size"}


def test_json_line_renders_values_json_cannot_encode() -> None:
    entry = json.loads(JsonFormatter().format(record(where=object())))
    assert entry["where"].startswith("<object object")


def test_json_line_holds_the_traceback() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        rec = record()
        rec.exc_info = sys.exc_info()
    entry = json.loads(JsonFormatter().format(rec))
    assert "RuntimeError: boom" in entry["exception"]


def test_text_line_is_level_message_then_context() -> None:
    line = TextFormatter().format(record(event_id="e-1", attempt=3))
    assert "WARNING publish failed: unroutable  event_id=e-1 attempt=3" in line
    assert "\n" not in line


def test_text_line_without_context_has_no_trailing_spaces() -> None:
    line = TextFormatter().format(record("stopped", ()))
    assert line.endswith("WARNING stopped")


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    pika_level = logging.getLogger("pika").level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("pika").setLevel(pika_level)


@pytest.mark.usefixtures("restore_root_logger")
def test_configure_installs_one_handler_with_the_chosen_format() -> None:
    configure("debug", "json")
    root = logging.getLogger()
    assert root.level == logging.DEBUG
    assert len(root.handlers) == 1
    assert isinstance(root.handlers[0].formatter, JsonFormatter)
    assert logging.getLogger("pika").level == logging.CRITICAL

    configure("warning", "text")
    assert len(root.handlers) == 1
    assert isinstance(root.handlers[0].formatter, TextFormatter)


@pytest.mark.usefixtures("restore_root_logger")
def test_lines_logged_for_an_outbox_name_it_and_tasks_keep_the_name(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import asyncio

    from outbox_relay.observability.logs import OUTBOX

    configure("info", "json")
    log = logging.getLogger("outbox_relay.relay.loop")

    async def child() -> None:
        log.info("in a task it started")

    async def relay() -> None:
        log.info("in the relay")
        await asyncio.ensure_future(child())

    async def main() -> None:
        token = OUTBOX.set("billing")
        task = asyncio.ensure_future(relay())  # copies the context, as serve does
        OUTBOX.reset(token)
        log.info("outside")
        await task

    asyncio.run(main())

    entries = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert {e["message"]: e.get("outbox") for e in entries} == {
        "outside": None,
        "in the relay": "billing",
        "in a task it started": "billing",
    }
