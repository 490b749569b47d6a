"""The search attributes (an operator lists orders by `OrderState='failed'`, review or amount) and
current details an order workflow shows in Temporal's UI and CLI; a cluster creates them once (README)."""

from __future__ import annotations

from temporalio import workflow
from temporalio.common import SearchAttributeKey

with workflow.unsafe.imports_passed_through():
    from shared.contracts import OrderState, OrderStatus

ORDER_STATE = SearchAttributeKey.for_keyword("OrderState")  # as the events and the read model name it
AWAITING_REVIEW = SearchAttributeKey.for_bool("AwaitingReview")
ORDER_AMOUNT = SearchAttributeKey.for_float("OrderAmount")  # in currency units, as an operator types it
SEARCH_ATTRIBUTES = (ORDER_STATE, AWAITING_REVIEW, ORDER_AMOUNT)


def dev_server_arguments() -> list[str]:
    """`temporal server start-dev` arguments that register the search attributes."""
    return [
        argument
        for key in SEARCH_ATTRIBUTES
        for argument in ("--search-attribute", f"{key.name}={key.indexed_value_type.name}")
    ]


def show_state(status: OrderStatus, amount_cents: int) -> None:
    """With each batch of events: the search attributes, upserted if the state changed (one history
    event per batch, not per state change)."""
    if workflow.info().typed_search_attributes.get(ORDER_STATE) != status.state.value:
        workflow.upsert_search_attributes(
            [
                ORDER_STATE.value_set(status.state.value),
                AWAITING_REVIEW.value_set(status.state is OrderState.AWAITING_APPROVAL),
                ORDER_AMOUNT.value_set(amount_cents / 100),
            ]
        )


def show_details(status: OrderStatus) -> None:
    details = f"**{status.state.value}** at step {status.step.value}"
    workflow.set_current_details(f"{details}: {status.reason}" if status.reason else details)
