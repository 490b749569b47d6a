"""How the consumers (bridge, audit) treat a message: a body that is not the contract's JSON is dead-lettered,
a transient outage retried in place, any other failure requeued until its `max_deliveries`th delivery
dead-letters it. On stop, messages in flight get `drain_seconds`; what is left unacked comes again."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import TypeVar

import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import AMQPError
from prometheus_client import Counter
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError
from temporalio.service import RPCError, RPCStatusCode

from shared import broker, tracing
from shared.settings import DRAIN_SECONDS

T = TypeVar("T")
M = TypeVar("M")
Handler = Callable[[AbstractIncomingMessage, M], Awaitable[None]]  # a message and its validated body

FIRST_RETRY_DELAY_SECONDS = 0.1
MAX_RETRY_DELAY_SECONDS = 5.0

_TRANSIENT_RPC_STATUSES = frozenset(
    {RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.RESOURCE_EXHAUSTED}
)
# connection exceptions, server shutting down or starting, too many connections, lost races
_TRANSIENT_SQLSTATE_PREFIXES = ("08", "57P", "53300", "40001", "40P01")

log = structlog.get_logger(__name__)

MESSAGES_CONSUMED = Counter(
    "orderflow_messages_consumed", "Messages delivered to a consumer (a redelivery counts again)", ["queue"]
)
MESSAGES_REQUEUED = Counter(
    "orderflow_messages_requeued", "Messages handed back to their queue after a failure", ["queue"]
)
MESSAGES_DEAD_LETTERED = Counter(
    "orderflow_messages_dead_lettered", "Messages a consumer gave up on, by reason", ["queue", "reason"]
)


class InvalidMessage(Exception):
    """A body that is not JSON (`invalid_json`) or not the contract's schema (`schema_invalid`)."""

    def __init__(self, reason: str, error: str) -> None:
        super().__init__(error)
        self.reason = reason


class RetrySoon(Exception):
    """Work that cannot proceed yet but will: retried in place like a transient outage."""


class Stopping(Exception):
    """The consumer was asked to stop while a message was waiting out an outage."""


def parse_body(validate: Callable[[bytes], M], body: bytes) -> M:
    try:
        return validate(body)
    except ValidationError as exc:
        not_json = any(error["type"] == "json_invalid" for error in exc.errors())
        raise InvalidMessage("invalid_json" if not_json else "schema_invalid", str(exc)) from exc


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same work later can succeed: Temporal or PostgreSQL unreachable."""
    if isinstance(exc, RetrySoon):
        return True
    if isinstance(exc, RPCError):
        return exc.status in _TRANSIENT_RPC_STATUSES
    if isinstance(exc, DBAPIError):
        sqlstate = getattr(exc.orig, "sqlstate", None) or ""
        return exc.connection_invalidated or sqlstate.startswith(_TRANSIENT_SQLSTATE_PREFIXES)
    # asyncpg raises OSError (refused, reset, timed out) when it cannot reach the server
    return isinstance(exc, OSError)


async def retry_transient(operation: Callable[[], Awaitable[T]], stop: asyncio.Event) -> T:
    """Run `operation` until it succeeds or fails for good; `Stopping` if stopped meanwhile."""
    delay = FIRST_RETRY_DELAY_SECONDS
    while True:
        try:
            return await operation()
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("transient failure, retrying", error=repr(exc), retry_in_seconds=delay)
        if await stopped_within(stop, delay):
            raise Stopping
        delay = min(delay * 2, MAX_RETRY_DELAY_SECONDS)


async def stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    with suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    return stop.is_set()


async def periodically(
    stop: asyncio.Event, seconds: float, work: Callable[[], Awaitable[object]], failed: str
) -> None:
    """`work()` every `seconds` until `stop`; a failed round is logged as `failed` and waits for the next."""
    while not await stopped_within(stop, seconds):
        try:
            await work()
        except Exception as error:  # noqa: BLE001 (housekeeping never stops its service)
            log.warning(failed, error=repr(error))


@dataclass
class QueueConsumer:
    """Feeds one queue's messages to a handler until stopped; settles what the handler could not."""

    name: str
    topology: broker.Topology
    max_deliveries: int
    stop: asyncio.Event
    drain_seconds: float = DRAIN_SECONDS
    _in_flight: set[asyncio.Task[object]] = field(default_factory=set, init=False)

    async def run(self, queue: AbstractQueue, validate: Callable[[bytes], M], handle: Handler[M]) -> None:
        """Consume until `stop` is set, then give in-flight messages `drain_seconds` to finish."""

        async def on_message(message: AbstractIncomingMessage) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._in_flight.add(task)
            MESSAGES_CONSUMED.labels(queue.name).inc()
            try:
                with tracing.consuming(message, queue.name):
                    await self._handle_safely(message, queue.name, validate, handle)
            finally:
                self._in_flight.discard(task)

        consumer_tag = await queue.consume(on_message)
        log.info("consuming", queue=queue.name)
        try:
            await self.stop.wait()
        finally:
            loop = asyncio.get_running_loop()
            drained_by = loop.time() + self.drain_seconds
            with suppress(AMQPError, OSError, TimeoutError):
                await queue.cancel(consumer_tag, timeout=5)
            if self._in_flight:
                timeout = max(0.0, drained_by - loop.time())
                _, unfinished = await asyncio.wait(set(self._in_flight), timeout=timeout)
                if unfinished:
                    log.warning("drain time over: messages left for redelivery", messages=len(unfinished))
                for task in unfinished:
                    task.cancel()
            log.info("stopped consuming", queue=queue.name)

    async def _handle_safely(
        self, message: AbstractIncomingMessage, queue: str, validate: Callable[[bytes], M], handle: Handler[M]
    ) -> None:
        # every message runs in a task of its own (aio-pika's doing), so what the handler binds
        # here (order id, command id, ...) stays on this message's log lines
        structlog.contextvars.bind_contextvars(message_id=message.message_id)
        try:
            try:
                model = parse_body(validate, message.body)
            except InvalidMessage as invalid:
                tracing.record_failure(invalid)
                await self._dead_letter(message, queue, invalid.reason, str(invalid))
                return
            await handle(message, model)
        except Stopping:
            log.info("stopping; message left for redelivery")
        except Exception as error:  # noqa: BLE001 (any failure requeues: it never stops the consumer)
            tracing.record_failure(error)
            await self._requeue_or_give_up(message, queue, error)

    async def _requeue_or_give_up(
        self, message: AbstractIncomingMessage, queue: str, error: Exception
    ) -> None:
        deliveries = broker.delivery_count(message) + 1
        try:
            if deliveries >= self.max_deliveries:
                await self._dead_letter(message, queue, "processing_failed", repr(error))
            else:
                log.warning(
                    "processing failed, requeued", error=repr(error), deliveries=deliveries, exc_info=error
                )
                # reject, not nack: RabbitMQ >= 4.3 counts only rejects in a quorum queue's
                # x-delivery-count, and that count is what sends a poison message to the DLQ
                await message.reject(requeue=True)
                MESSAGES_REQUEUED.labels(queue).inc()
        except Exception:
            # the channel is gone: the broker hands the message out again after reconnecting
            log.exception("could not settle message", error=repr(error))

    async def _dead_letter(
        self, message: AbstractIncomingMessage, queue: str, reason: str, error: str
    ) -> None:
        await broker.dead_letter(self.topology, message, consumer=self.name, reason=reason, error=error)
        MESSAGES_DEAD_LETTERED.labels(queue, reason).inc()
        log.error("message dead-lettered", outcome="dead_lettered", reason=reason, error=error)
