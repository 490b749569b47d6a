"""Structured logs: one JSON line per event, from structlog and from the standard library alike.

Workflow code logs through `temporalio.workflow.logger` (standard logging, silent during replay);
its `extra` fields (order_id, step, attempt, ...) land in the same JSON lines.
"""

from __future__ import annotations

import logging
import sys

import structlog
from pydantic import ValidationError
from structlog.typing import EventDict, Processor, WrappedLogger

from shared.settings import Settings, get_settings, invalid_settings_message

_SKIPPED_RECORD_FIELDS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)


def _record_extras(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Copy a standard-library record's `extra=` fields into the event (Temporal's context too)."""
    record: logging.LogRecord | None = event_dict.get("_record")
    if record is not None:
        for key, value in vars(record).items():
            if key not in _SKIPPED_RECORD_FIELDS and not key.startswith("_") and key not in event_dict:
                event_dict[key] = value
    return event_dict


def configure_logging(settings: Settings, service: str) -> None:
    shared_processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        # tracebacks as data, without local variables (they hold whole requests and secrets)
        structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        ),
    ]
    renderer = (
        structlog.processors.JSONRenderer(default=str)
        if settings.log_json
        # plain tracebacks: the default (rich, with every frame's locals) shows what the JSON lines
        # keep out, and takes seconds on a slow machine, the event loop blocked meanwhile
        else structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
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
    """The settings; when one is bad, one log line naming it and exit code 2, not a traceback. The
    line is JSON, the default: the settings that could choose otherwise are what could not be read."""
    try:
        return get_settings()
    except ValidationError as error:
        configure_logging(Settings.model_construct(), service)
        structlog.get_logger().critical(invalid_settings_message(error))
        raise SystemExit(2) from None
