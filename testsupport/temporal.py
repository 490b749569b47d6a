"""Temporal look-ups of the tests."""

from __future__ import annotations

from typing import Any

from temporalio.client import Client, WorkflowExecutionDescription, WorkflowHandle
from temporalio.service import RPCError, RPCStatusCode

from shared.lifecycle import order_workflow_id
from testsupport.polling import eventually


async def described(client: Client, order_id: str) -> WorkflowExecutionDescription:
    """The order's workflow, once it exists."""
    handle = client.get_workflow_handle(order_workflow_id(order_id))
    return await eventually(lambda: describe_if_started(handle))


async def describe_if_started(handle: WorkflowHandle[Any, Any]) -> WorkflowExecutionDescription | None:
    try:
        return await handle.describe()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            return None
        raise
