"""Structured logs: one JSON line per event, from structlog and the standard library (its `extra` fields
too, as workflow code's) alike, with the current span's `trace_id` and `span_id` when there is one."""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

import structlog
from opentelemetry import trace
from pydantic import ValidationError
from structlog.typing import EventDict, Processor, WrappedLogger

from shared.settings import Settings, invalid_settings_message

_SKIPPED_RECORD_FIELDS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    # uvicorn's records repeat the message, in ANSI colours, as `color_message`
    | {"message", "asctime", "color_message"}
)


def _record_extras(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Copy a standard-library record's `extra=` fields into the event (Temporal's context too)."""
    record: logging.LogRecord | None = event_dict.get("_record")
    if record is not None:
        for key, value in vars(record).items():
            if key not in _SKIPPED_RECORD_FIELDS and not key.startswith("_") and key not in event_dict:
                event_dict[key] = value
    return event_dict


def _trace_context(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """The current span's ids in OpenTelemetry's hex form, so a log line leads to its trace."""
    span = trace.get_current_span().get_span_context()
    if span.is_valid:
        event_dict["trace_id"] = trace.format_trace_id(span.trace_id)
        event_dict["span_id"] = trace.format_span_id(span.span_id)
    return event_dict


def configure_logging(settings: Settings, service: str) -> None:
    shared_processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _trace_context,
        # tracebacks as data, without local variables (they hold whole requests and secrets)
        structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        ),
    ]
    renderer = (
        structlog.processors.JSONRenderer(default=str)
        if settings.log_json
        # plain tracebacks (rich's show every frame's locals, blocking for seconds); no colour off a
        # terminal or with NO_COLOR set (https://no-color.org)
        else structlog.dev.ConsoleRenderer(
            colors=sys.stdout.isatty() and not os.environ.get("NO_COLOR"),
            exception_formatter=structlog.dev.plain_traceback,
        )
    )
    structlog.configure(
        # a line below the level is dropped before the processors spend time on it
        processors=[
            structlog.stdlib.filter_by_level,
            *shared_processors,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared_processors, _record_extras],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    for noisy in ("aiormq", "aio_pika", "sqlalchemy.engine", "httpx", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # every failed attempt is logged once, by the workflow, with its step and attempt number
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
    structlog.get_logger().critical(reason)
    raise SystemExit(2)
