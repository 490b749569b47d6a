"""Publishing commands for the gateway: a 202 needs the broker's confirm, anything less is a 503."""

from __future__ import annotations

import asyncio

import structlog
from aio_pika.exceptions import CONNECTION_EXCEPTIONS

from services.api.connections import BrokerLink, DependencyUnavailable, LazyConnection, describe
from shared.broker import CommandNotRouted, CommandRefused, publish_command
from shared.contracts import Command

PUBLISH_TIMEOUT_SECONDS = 5.0

log = structlog.get_logger(__name__)


class BacklogFull(Exception):
    """The broker refused a placement: as many orders wait for admission as the system takes.
    The gateway answers 503 with Retry-After; nothing was published."""


class CommandPublisher:
    """Publishes on the gateway's one broker channel, connecting first if the broker was down."""

    def __init__(self, broker: LazyConnection[BrokerLink]) -> None:
        self._broker = broker

    async def publish(self, command: Command) -> None:
        """Returns once the broker confirmed the command; raises `DependencyUnavailable` otherwise."""
        context = {
            "order_id": command.order_id,
            "command_id": str(command.command_id),
            "type": command.type.value,
        }
        link = await self._broker.get()
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT_SECONDS):
                await publish_command(link.topology, command)
        except CommandRefused as refused:
            log.warning("placement refused: backlog full", **context)
            raise BacklogFull(
                "too many orders are waiting to start: the placement was not accepted; "
                "retry after the time in Retry-After"
            ) from refused
        except (CommandNotRouted, TimeoutError, *CONNECTION_EXCEPTIONS) as error:
            log.warning("command not accepted", **context, reason=describe(error))
            raise DependencyUnavailable(
                "broker", f"the command was not accepted ({describe(error)})"
            ) from error
        log.info("command accepted", **context, correlation_id=command.correlation_id)
