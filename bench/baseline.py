"""The baseline as a system under test: `bench/bare_lifecycle.py` on a Temporal dev server of its
own (the same server flags as the pipeline's), its worker a separate process.

The bench takes each order at once and starts its workflow once fewer than the pipeline's bound
(`max_running_lifecycles`) run, as the pipeline's admission does (the start being accepted counts
as its admission); it signals `approve` when the worker reports the order waiting for it, and
takes the ending from the worker's report. CPU is the server's and the worker's, and PostgreSQL's
and RabbitMQ's, which the baseline does not use: what they spend meanwhile is the machine's
background.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import IO, cast

from temporalio.client import Client

from bench import bare_lifecycle as bare
from bench.load import place_command
from bench.measure import Ledger, cpu_by_kind, server_pids
from devstack.stack import (
    RUN_DIR,
    Stack,
    TemporalDevServer,
    free_port,
    service_environment,
    service_of,
    wait_for_port,
    with_payload_keys,
)
from shared.contracts import EventType
from shared.lifecycle import WORKFLOW_TASK_TIMEOUT, OrderWorkflowInput
from shared.settings import Settings
from shared.temporal import connect_temporal

REPO = Path(__file__).resolve().parents[1]
NOTICE = re.compile(rf"{bare.NOTICE_MARK} (?P<order_id>\S+) (?P<event>{'|'.join(bare.NOTICES)})$")
WORKER = "bare-worker"
WARM_UP_SECONDS = 2.0


class NoticeTap(io.TextIOBase):
    """The stack's log: every line goes to `log`; the worker's notices also to `on_notice`."""

    def __init__(self, log: IO[str], on_notice: Callable[[str, str], None]) -> None:
        self._log = log
        self._on_notice = on_notice

    def write(self, text: str) -> int:
        self._log.write(text)
        if notice := NOTICE.search(text):
            self._on_notice(notice["order_id"], notice["event"])
        return len(text)

    def flush(self) -> None:
        self._log.flush()


class Baseline:
    """The server and the worker as child processes (their output to `log`), and a client."""

    def __init__(self, log: IO[str], ledger: Ledger, settings: Settings, servers: dict[str, int]) -> None:
        self.stack = Stack(cast(IO[str], NoticeTap(log, self.on_notice)))
        self._ledger = ledger
        self._policy = settings.lifecycle_policy()
        self._slots = asyncio.Semaphore(settings.max_running_lifecycles)
        self._servers = servers
        self._client: Client | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def connected(self, client: Client) -> None:
        self._client = client

    async def place(self, order_id: str) -> None:
        self._in_background(self._start(order_id))

    async def _start(self, order_id: str) -> None:
        """Start the order's lifecycle once a slot is free; its end frees the slot."""
        assert self._client is not None
        await self._slots.acquire()
        try:
            await self._client.start_workflow(
                bare.BareOrderWorkflow.run,
                OrderWorkflowInput(order=place_command(order_id), policy=self._policy),
                id=bare.workflow_id(order_id),
                task_queue=bare.ORDER_TASK_QUEUE,
                task_timeout=WORKFLOW_TASK_TIMEOUT,  # as the bridge starts lifecycles
            )
        except Exception as error:  # noqa: BLE001 (counted as the order's placement error)
            self._ledger.orders[order_id].error = f"{type(error).__name__}: {error}"
            self._slots.release()
            return
        self._ledger.observe(order_id, EventType.ADMITTED)

    def cpu_seconds(self) -> dict[str, float]:
        return cpu_by_kind(self.stack.pids() | self._servers, service_of)

    def on_notice(self, order_id: str, event: str) -> None:
        kind = EventType(event)
        clock = self._ledger.orders.get(order_id)
        if clock is None:
            return
        ends_it = kind.is_terminal and clock.ending is None  # a notice may come twice
        self._ledger.observe(order_id, kind)
        if ends_it:
            self._slots.release()
        elif kind is EventType.AWAITING_APPROVAL and not clock.approval_requested:
            clock.approval_requested = True
            self._in_background(self._approve(order_id))

    async def _approve(self, order_id: str) -> None:
        assert self._client is not None
        await self._client.get_workflow_handle(bare.workflow_id(order_id)).signal(
            bare.BareOrderWorkflow.approve
        )
        self._ledger.observe(order_id, EventType.APPROVED)

    def _in_background(self, work: Coroutine[None, None, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


@asynccontextmanager
async def running_baseline(settings: Settings, ledger: Ledger) -> AsyncIterator[Baseline]:
    """The baseline with the lifecycle policy and admission bound of `settings`."""
    temporal = TemporalDevServer(port=free_port(), ui_port=free_port(), ui=False)
    address = f"127.0.0.1:{temporal.port}"
    with tempfile.NamedTemporaryFile("w", prefix="orderflow-baseline-", suffix=".log", delete=False) as log:
        print(f"  (baseline logs: {log.name})", file=sys.stderr)
        async with AsyncExitStack() as exits:
            baseline = Baseline(log, ledger, settings, server_pids(settings))
            stack = baseline.stack
            exits.push_async_callback(stack.close)
            await stack.start("temporal", temporal.command(), dict(os.environ))
            await wait_for_port(temporal.port)
            worker_settings = with_payload_keys(
                settings.model_copy(update={"temporal_address": address}), RUN_DIR
            )
            worker_env = service_environment(worker_settings) | {"PYTHONPATH": str(REPO)}
            await stack.start(
                WORKER, [sys.executable, "-m", "bench.bare_lifecycle", "--address", address], worker_env
            )
            baseline.connected(await connect_temporal(worker_settings))
            await asyncio.sleep(WARM_UP_SECONDS)
            yield baseline
