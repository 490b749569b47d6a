"""What Temporal's UI and CLI show of an order workflow besides its status: the custom search
attributes it keeps current, so that an operator lists orders by state (`OrderState='failed'`),
review or amount, and its current details. Every Temporal server the project starts registers the
attributes from `SEARCH_ATTRIBUTES`; a cluster has them created once (README).
"""

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


def show(status: OrderStatus, amount_cents: int) -> None:
    """In the workflow, at a state change: the search attributes (one history event, only when the
    state differs from what they say) and the current details."""
    if workflow.info().typed_search_attributes.get(ORDER_STATE) != status.state.value:
        workflow.upsert_search_attributes(
            [
                ORDER_STATE.value_set(status.state.value),
                AWAITING_REVIEW.value_set(status.state is OrderState.AWAITING_APPROVAL),
                ORDER_AMOUNT.value_set(amount_cents / 100),
            ]
        )
    details = f"**{status.state.value}** at step {status.step.value}"
    workflow.set_current_details(f"{details}: {status.reason}" if status.reason else details)
