"""No order data in plaintext in Temporal: a real order's histories (the order's and its shipment's),
read raw from the dev server, hold none of the recipient's name, street, city and postal code nor
the payment id; an operator reads them decrypted through the gateway's codec server."""

from __future__ import annotations

import base64
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from google.protobuf.message import Message
from temporalio.api.common.v1 import Payload
from temporalio.client import Client, WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter

from services.workers.activity_interface import OrderActivities
from shared.codec import ENCODING, EncryptionCodec, payload_keyring
from shared.contracts import EventType, OrderState, Role
from shared.settings import Settings
from testsupport.gateway import bearer
from workflow_harness import NEW_ADDRESS, OrderHarness, fails, order_harness

TEMPORAL = str(Path(sys.executable).parent / "temporal")


def payloads_in(message: Message) -> Iterator[Payload]:
    """Every payload anywhere in `message` (events, failures, their causes, maps of payloads)."""
    if isinstance(message, Payload):
        yield message
        return
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        if isinstance(value, Message):
            children = [value]
        elif field.message_type.GetOptions().map_entry:
            children = list(value.values())
        else:
            children = list(value)
        for child in children:
            if isinstance(child, Message):
                yield from payloads_in(child)


def history_payloads(history: WorkflowHistory) -> list[Payload]:
    return [payload for event in history.events for payload in payloads_in(event)]


def private_data(harness: OrderHarness) -> list[str]:
    """What of the order must not be readable in Temporal: the recipient, where to, the payment."""
    order = harness.order
    texts = [order.payload.payment_id]
    for address in (order.payload.address, NEW_ADDRESS):
        texts += [address.name, address.line1, address.city, address.postal_code]
    return texts


def assert_unreadable(history: WorkflowHistory, private: list[str]) -> None:
    everything = history.to_json()
    payloads = history_payloads(history)
    # plaintext stays only Temporal's own bookkeeping: markers' step names and times, patch ids,
    # search attributes
    assert any(payload.metadata["encoding"] == ENCODING for payload in payloads)
    for text in private:
        assert text not in everything, text
        assert base64.b64encode(text.encode()).decode() not in everything, text
        assert not any(text.encode() in payload.data for payload in payloads), text


async def raw_histories(settings: Settings, workflow_ids: list[str]) -> dict[str, WorkflowHistory]:
    """As anyone with read access to Temporal sees them: a client without the payload keys."""
    client = await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=pydantic_data_converter,
    )
    return {wid: await client.get_workflow_handle(wid).fetch_history() for wid in workflow_ids}


def temporal_cli(settings: Settings, *arguments: str) -> str:
    ran = subprocess.run(
        [
            TEMPORAL,
            *arguments,
            "--address",
            settings.temporal_address,
            "--namespace",
            settings.temporal_namespace,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return ran.stdout


async def test_a_real_orders_histories_hold_no_plaintext_order_data(
    temporal_client: Client, settings: Settings, gateway_url: str
) -> None:
    async with order_harness(temporal_client) as harness:
        # a failed attempt's message that quotes the address travels encrypted too
        refusal = f"carrier cannot reach {NEW_ADDRESS.name}, {NEW_ADDRESS.line1}"
        harness.mocks.script(OrderActivities.dispatch_carrier, fails(refusal))
        await harness.start()
        await harness.wait_for_event(EventType.AWAITING_APPROVAL)
        await harness.update_address(NEW_ADDRESS)
        await harness.approve()
        status = await harness.result()
        assert status.state is OrderState.COMPLETED
        workflow_ids = [harness.workflow_id, harness.shipment_id(1)]
        private = private_data(harness)

    histories = await raw_histories(settings, workflow_ids)
    for workflow_id in workflow_ids:
        assert_unreadable(histories[workflow_id], private)
        shown = temporal_cli(settings, "workflow", "show", "--workflow-id", workflow_id, "--output", "json")
        assert_unreadable(WorkflowHistory.from_json(workflow_id, shown), private)

    # the data is there, sealed: the keys open it, and an operator reads it through the codec server
    codec = EncryptionCodec(payload_keyring(settings))
    sealed = [payload for history in histories.values() for payload in history_payloads(history)]
    opened = b"".join(payload.data for payload in await codec.decode(sealed))
    assert all(text.encode() in opened for text in private)
    assert refusal.encode() in opened
    token = bearer(settings, "olga", Role.OPERATOR)["Authorization"]
    decoded = temporal_cli(
        settings,
        "workflow",
        "show",
        "--workflow-id",
        harness.workflow_id,
        "--codec-endpoint",
        f"{gateway_url}/codec",
        "--codec-auth",
        token,
    )
    assert NEW_ADDRESS.line1 in decoded
