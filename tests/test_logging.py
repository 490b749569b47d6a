"""Log lines by the ecosystem's conventions: colour only on a terminal and never with NO_COLOR, no field
twice, the trace and span ids of the span a line was written in, the same fields from structlog and the
standard library, and structlog's own lines without the standard library's records (each case in a
process of its own, which configures logging for good)."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import textwrap
from typing import Any

import pytest

ESCAPE = "\x1b"

PROBE = textwrap.dedent(
    """
    import json
    import logging
    import sys

    import structlog
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    from shared.logging import configure_logging
    from shared.settings import Settings

    configure_logging(Settings(_env_file=None, log_json=sys.argv[1] == "json"), "probe")
    recorded = []  # the names of the standard-library loggers that made a record
    make_record = logging.getLogRecordFactory()

    def recording(name, *args, **kwargs):
        recorded.append(name)
        return make_record(name, *args, **kwargs)

    logging.setLogRecordFactory(recording)
    trace.set_tracer_provider(TracerProvider())
    steps = structlog.get_logger("services.workers.steps")
    steps.warning("step attempt failed", order_id="o-1", step="charge_payment", attempt=2, error="timed out")
    steps.debug("below the level")
    logging.getLogger("sqlalchemy.engine").info("below a library's level")
    # workflow.logger's way: the context as `extra` fields
    logging.getLogger("temporalio.workflow").info("state transition", extra={"order_id": "o-1", "seq": 3})
    try:
        raise ValueError("from structlog")
    except ValueError:
        steps.exception("failed in structlog")
    try:
        raise ValueError("from the standard library")
    except ValueError:
        logging.getLogger("temporalio.worker").exception("failed in the standard library")
    structlog.get_logger().warning("outside a span")
    with trace.get_tracer("probe").start_as_current_span("probing") as span:
        structlog.get_logger().warning("inside a span")
        # what uvicorn logs as its server starts: the message again, coloured, as `color_message`
        coloured = "Started server process [\\x1b[36m%d\\x1b[0m]"
        uvicorn = logging.getLogger("uvicorn.error")
        uvicorn.warning("Started server process [%d]", 7, extra={"color_message": coloured})
    ids = span.get_span_context()
    span_ids = {"trace_id": f"{ids.trace_id:032x}", "span_id": f"{ids.span_id:016x}"}
    print(json.dumps({"span": span_ids, "recorded": recorded}))
    """
)


def run_probe(renderer: str, *, terminal: bool = False, no_color: str | None = None) -> str:
    """What the probe writes to its standard output: a pipe, or a terminal of its own."""
    environment = {key: value for key, value in os.environ.items() if key != "NO_COLOR"}
    if no_color is not None:
        environment["NO_COLOR"] = no_color
    command = [sys.executable, "-c", PROBE, renderer]
    if not terminal:
        return subprocess.run(
            command, env=environment, capture_output=True, text=True, check=True, timeout=60
        ).stdout
    controller, terminal_end = pty.openpty()
    try:
        subprocess.run(command, env=environment, stdout=terminal_end, check=True, timeout=60)
    finally:
        os.close(terminal_end)
    written = b""
    try:
        while chunk := os.read(controller, 4096):
            written += chunk
    except OSError:  # EIO: the other end is closed and all it wrote has been read
        pass
    finally:
        os.close(controller)
    return written.decode()


def json_lines() -> tuple[dict[str, Any], dict[str, Any]]:
    """The probe's log lines by event, and what it reported at its end."""
    *lines, report = [json.loads(line) for line in run_probe("json").splitlines()]
    return {line["event"]: line for line in lines}, report


def test_console_lines_are_coloured_on_a_terminal_only() -> None:
    assert ESCAPE in run_probe("console", terminal=True)
    redirected = run_probe("console")
    assert "inside a span" in redirected and ESCAPE not in redirected


@pytest.mark.parametrize("no_color", ["1", "true"])
def test_no_color_turns_colour_off_on_a_terminal_too(no_color: str) -> None:
    written = run_probe("console", terminal=True, no_color=no_color)
    assert "inside a span" in written and ESCAPE not in written


def test_an_empty_no_color_leaves_colour_on() -> None:
    assert ESCAPE in run_probe("console", terminal=True, no_color="")


def test_json_lines_carry_no_repeated_message_and_no_escape_codes() -> None:
    written = run_probe("json")
    assert ESCAPE not in written
    *lines, _ = [json.loads(line) for line in written.splitlines()]
    uvicorn = [line for line in lines if line["logger"] == "uvicorn.error"]
    assert [line["event"] for line in uvicorn] == ["Started server process [7]"]
    assert "color_message" not in uvicorn[0]


def test_a_line_written_inside_a_span_carries_its_trace_and_span_ids() -> None:
    by_event, report = json_lines()
    span = report["span"]
    assert "trace_id" not in by_event["outside a span"] and "span_id" not in by_event["outside a span"]
    for event in ("inside a span", "Started server process [7]"):
        assert (by_event[event]["trace_id"], by_event[event]["span_id"]) == (
            span["trace_id"],
            span["span_id"],
        )


def test_console_lines_show_plain_tracebacks_from_structlog_and_the_standard_library() -> None:
    written = run_probe("console")
    assert written.count("Traceback (most recent call last):") == 2
    assert "ValueError: from structlog" in written and "ValueError: from the standard library" in written


def test_structlog_and_standard_library_lines_carry_their_fields_alike() -> None:
    by_event, _ = json_lines()
    failed = by_event["step attempt failed"]
    assert {key: failed[key] for key in ("order_id", "step", "attempt", "error")} == {
        "order_id": "o-1",
        "step": "charge_payment",
        "attempt": 2,
        "error": "timed out",
    }
    transition = by_event["state transition"]
    assert (transition["order_id"], transition["seq"]) == ("o-1", 3)
    for line, logger, level in [
        (failed, "services.workers.steps", "warning"),
        (transition, "temporalio.workflow", "info"),
    ]:
        assert (line["logger"], line["level"], line["service"]) == (logger, level, "probe")
        assert "timestamp" in line and "_record" not in line


def test_lines_below_the_level_are_not_written() -> None:
    by_event, _ = json_lines()
    assert "below the level" not in by_event and "below a library's level" not in by_event


def test_tracebacks_are_data_in_structlog_and_standard_library_lines() -> None:
    by_event, _ = json_lines()
    for event, message in [
        ("failed in structlog", "from structlog"),
        ("failed in the standard library", "from the standard library"),
    ]:
        (exception,) = by_event[event]["exception"]
        assert (exception["exc_type"], exception["exc_value"]) == ("ValueError", message)
        assert all("locals" not in frame for frame in exception["frames"])


def test_structlog_lines_make_no_standard_library_record() -> None:
    _, report = json_lines()
    assert report["recorded"] == ["temporalio.workflow", "temporalio.worker", "uvicorn.error"]
