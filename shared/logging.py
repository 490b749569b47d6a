"""Structured logs: one JSON line per event, from structlog and the standard library (its `extra` fields
too, as workflow code's) alike, with the current span's `trace_id` and `span_id` when there is one."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, NoReturn, TextIO

import structlog
from opentelemetry import trace
from pydantic import ValidationError
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import EventDict, WrappedLogger

from shared.settings import Settings, invalid_settings_message

_SKIPPED_RECORD_FIELDS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    # uvicorn's records repeat the message, in ANSI colours, as `color_message`
    | {"message", "asctime", "color_message"}
)


def _record_extras(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Copy a standard-library record's `extra=` fields into the event (Temporal's context too)."""
    record = event_dict.pop("_record", None)
    for key, value in vars(record).items() if record else ():
        if key not in _SKIPPED_RECORD_FIELDS and not key.startswith("_") and key not in event_dict:
            event_dict[key] = value
    return event_dict


def _trace_context(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """The current span's ids in OpenTelemetry's hex form, so a log line leads to its trace."""
    if (span := trace.get_current_span().get_span_context()).is_valid:
        event_dict["trace_id"] = trace.format_trace_id(span.trace_id)
        event_dict["span_id"] = trace.format_span_id(span.span_id)
    return event_dict


class _StdoutLogger(structlog.WriteLogger):
    """structlog's lines straight to standard output, named as `get_logger` was asked (the `logger` field)."""

    def __init__(self, name: str | None = None) -> None:
        super().__init__(sys.stdout)
        self.name = name


class _RecordLines(logging.StreamHandler[TextIO]):
    """Standard-library records as structlog's own lines: through its processors, without a record's copy."""

    def format(self, record: logging.LogRecord) -> str:
        line: Any = {"event": record.getMessage(), "_record": record, "exc_info": record.exc_info}
        for processor in structlog.get_config()["processors"]:
            line = processor(None, record.levelname.lower(), line)
        return str(line)


def configure_logging(settings: Settings, service: str) -> None:
    logging.root.setLevel(settings.log_level.upper())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _trace_context,
            # tracebacks without local variables (they hold whole requests and secrets): data in JSON, plain
            # text on a console (rich's show every frame's locals, blocking for seconds)
            structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False))
            if settings.log_json
            else structlog.processors.format_exc_info,
            _record_extras,
            structlog.processors.JSONRenderer(default=str)
            if settings.log_json
            # no colour off a terminal or with NO_COLOR set (https://no-color.org)
            else structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty() and not os.environ.get("NO_COLOR")),
        ],
        logger_factory=_StdoutLogger,
        wrapper_class=structlog.make_filtering_bound_logger(logging.root.level),
        cache_logger_on_first_use=True,
    )
    logging.root.handlers[:] = [_RecordLines(sys.stdout)]
    for noisy in ("aiormq", "aio_pika", "sqlalchemy.engine", "httpx", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # every failed attempt is logged once, by its step (`steps._failed_attempt`), with its number
    logging.getLogger("temporalio.activity").setLevel(logging.ERROR)
    structlog.contextvars.bind_contextvars(service=service)


def settings_or_exit(service: str) -> Settings:
    """The settings; when one is bad, `stop_starting` naming it (in JSON: nothing else could be read)."""
    try:
        return Settings()
    except ValidationError as error:
        configure_logging(Settings.model_construct(), service)
        stop_starting(invalid_settings_message(error))


def stop_starting(reason: str) -> NoReturn:
    """Stop a service that cannot start with one critical log line and exit code 2, not a traceback."""
    structlog.get_logger(__name__).critical(reason)
    raise SystemExit(2)
