"""The baseline as a system under test: `bench/bare_lifecycle.py` on a Temporal dev server of its
own (the same server flags as the pipeline's), its worker a separate process.

The bench starts each order's workflow (the start being accepted counts as its admission),
signals `approve` when the worker reports the order waiting for it, and takes the ending from the
worker's report. CPU is the server's plus the worker's.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import IO, cast

from temporalio.client import Client

from bench import bare_lifecycle as bare
from bench.load import place_command
from bench.measure import Ledger, cpu_by_kind
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
from shared.lifecycle import WORKFLOW_TASK_TIMEOUT, LifecyclePolicy, OrderWorkflowInput
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

    def __init__(self, log: IO[str], ledger: Ledger, policy: LifecyclePolicy) -> None:
        self.stack = Stack(cast(IO[str], NoticeTap(log, self.on_notice)))
        self._ledger = ledger
        self._policy = policy
        self._client: Client | None = None
        self._approvals: set[asyncio.Task[None]] = set()

    def connected(self, client: Client) -> None:
        self._client = client

    async def place(self, order_id: str) -> None:
        assert self._client is not None
        await self._client.start_workflow(
            bare.BareOrderWorkflow.run,
            OrderWorkflowInput(order=place_command(order_id), policy=self._policy),
            id=bare.workflow_id(order_id),
            task_queue=bare.ORDER_TASK_QUEUE,
            task_timeout=WORKFLOW_TASK_TIMEOUT,  # as the bridge starts lifecycles
        )
        self._ledger.observe(order_id, EventType.ADMITTED)

    def cpu_seconds(self) -> dict[str, float]:
        return cpu_by_kind(self.stack.pids(), service_of)

    def on_notice(self, order_id: str, event: str) -> None:
        clock = self._ledger.observe(order_id, EventType(event))
        if clock is not None and event == bare.AWAITING_APPROVAL and not clock.approval_requested:
            clock.approval_requested = True
            task = asyncio.create_task(self._approve(order_id))
            self._approvals.add(task)
            task.add_done_callback(self._approvals.discard)

    async def _approve(self, order_id: str) -> None:
        assert self._client is not None
        await self._client.get_workflow_handle(bare.workflow_id(order_id)).signal(
            bare.BareOrderWorkflow.approve
        )


@asynccontextmanager
async def running_baseline(policy: LifecyclePolicy, ledger: Ledger) -> AsyncIterator[Baseline]:
    temporal = TemporalDevServer(port=free_port(), ui_port=free_port(), ui=False)
    address = f"127.0.0.1:{temporal.port}"
    with tempfile.NamedTemporaryFile("w", prefix="orderflow-baseline-", suffix=".log", delete=False) as log:
        print(f"  (baseline logs: {log.name})", file=sys.stderr)
        async with AsyncExitStack() as exits:
            baseline = Baseline(log, ledger, policy)
            stack = baseline.stack
            exits.push_async_callback(stack.close)
            await stack.start("temporal", temporal.command(), dict(os.environ))
            await wait_for_port(temporal.port)
            settings = with_payload_keys(Settings(temporal_address=address), RUN_DIR)
            worker_env = service_environment(settings) | {"PYTHONPATH": str(REPO)}
            await stack.start(
                WORKER, [sys.executable, "-m", "bench.bare_lifecycle", "--address", address], worker_env
            )
            baseline.connected(await connect_temporal(settings))
            await asyncio.sleep(WARM_UP_SECONDS)
            yield baseline
