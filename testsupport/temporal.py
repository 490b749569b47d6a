"""Temporal look-ups of the tests, and the search attributes their time-skipping servers need."""

from __future__ import annotations

from typing import Any

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.client import Client, WorkflowExecutionDescription, WorkflowHandle
from temporalio.service import RPCError, RPCStatusCode

from services.workers.visibility import SEARCH_ATTRIBUTES
from shared.lifecycle import order_workflow_id
from testsupport.polling import eventually


async def register_search_attributes(client: Client) -> None:
    """What `start_local(search_attributes=...)` does for a dev server, for the time-skipping one."""
    types = {key.name: IndexedValueType.ValueType(key.indexed_value_type) for key in SEARCH_ATTRIBUTES}
    request = AddSearchAttributesRequest(namespace=client.namespace, search_attributes=types)
    await client.operator_service.add_search_attributes(request)


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
