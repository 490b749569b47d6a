"""Log lines by the ecosystem's conventions: colour only on a terminal and never with NO_COLOR, no field
twice, and the trace and span ids of the span a line was written in (each case in a process of its
own, which configures logging for good)."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import textwrap

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
    trace.set_tracer_provider(TracerProvider())
    structlog.get_logger().warning("outside a span")
    with trace.get_tracer("probe").start_as_current_span("probing") as span:
        structlog.get_logger().warning("inside a span")
        # what uvicorn logs as its server starts: the message again, coloured, as `color_message`
        coloured = "Started server process [\\x1b[36m%d\\x1b[0m]"
        uvicorn = logging.getLogger("uvicorn.error")
        uvicorn.warning("Started server process [%d]", 7, extra={"color_message": coloured})
    ids = span.get_span_context()
    print(json.dumps({"span": {"trace_id": f"{ids.trace_id:032x}", "span_id": f"{ids.span_id:016x}"}}))
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
    uvicorn = [json.loads(line) for line in written.splitlines() if "uvicorn.error" in line]
    assert [line["event"] for line in uvicorn] == ["Started server process [7]"]
    assert "color_message" not in uvicorn[0]


def test_a_line_written_inside_a_span_carries_its_trace_and_span_ids() -> None:
    *lines, ids = [json.loads(line) for line in run_probe("json").splitlines()]
    span = ids["span"]
    by_event = {line["event"]: line for line in lines}
    assert "trace_id" not in by_event["outside a span"] and "span_id" not in by_event["outside a span"]
    for event in ("inside a span", "Started server process [7]"):
        assert (by_event[event]["trace_id"], by_event[event]["span_id"]) == (
            span["trace_id"],
            span["span_id"],
        )
