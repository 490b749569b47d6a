"""Human-readable text for the gateway's answers (`--json` prints them as they are)."""

from __future__ import annotations

import json
from collections.abc import Sequence

from services.cli.gateway import Answer
from shared.contracts import RecordedEvent


def accepted(answer: Answer) -> str:
    return (
        f"accepted: {answer['type']} for order {answer['order_id']} (command {answer['command_id']})\n"
        f"follow it: orderflow status {answer['order_id']}"
    )


def order_status(status: Answer) -> str:
    source = "its workflow" if status["source"] == "workflow" else "the orders table"
    step = f", step {status['step']}" if status.get("step") else ""
    rows = [
        ("payment", status["payment_id"]),
        ("address", ", ".join(str(value) for value in status["address"].values() if value)),
        ("attempts", ", ".join(f"{step} {count}" for step, count in status.get("attempts", {}).items())),
        ("errors", "".join(f"\n    {step_error(error)}" for error in status.get("recent_errors", []))),
        ("shipping", status.get("shipping_attempts") and f"{status['shipping_attempts']} attempt(s)"),
        ("refunded", "yes" if status.get("refunded") else ""),
        ("reason", status.get("reason")),
        ("tracking", status.get("tracking_number")),
        ("started", status["started_at"]),
        ("updated", status["updated_at"]),
        ("finished", status.get("finished_at")),
    ]
    lines = [f"order {status['order_id']}: {status['state']}{step} (from {source})"]
    lines += [f"  {label:<9} {value}" for label, value in rows if value]
    return "\n".join(lines)


def step_error(error: Answer) -> str:
    return f"{error['step']} attempt {error['attempt']} at {error['at']}: {error['error']}"


def order_page(page: Answer) -> str:
    if not page["items"]:
        return "no orders"
    rows = [
        [order["order_id"], order["state"], f"{order['amount_cents'] / 100:.2f}", order["created_at"]]
        for order in page["items"]
    ]
    text = table(["ORDER", "STATE", "AMOUNT", "CREATED"], rows)
    if page.get("next_cursor"):
        text += f"\nmore: orderflow list --cursor {page['next_cursor']}"
    return text


def history(answer: Answer) -> str:
    if not answer["events"]:
        return f"order {answer['order_id']} has no events yet"
    return "\n".join(event(RecordedEvent.model_validate(item)) for item in answer["events"])


def event(order_event: RecordedEvent) -> str:
    item = order_event.model_dump(mode="json")
    data = f"  {json.dumps(item['data'], sort_keys=True)}" if item["data"] else ""
    return f"{item['occurred_at']}  #{item['seq']:<3} {item['order_id']}  {item['type']}{data}"


def health(found: Answer) -> str:
    rows = [["gateway", "live", found["gateway"]]]
    rows += [
        [name, "ok" if check["ok"] else "FAILED", check["detail"]] for name, check in found["checks"].items()
    ]
    verdict = "ready" if found["ready"] else f"not ready: {', '.join(found['failed'])}"
    return f"{table(['DEPENDENCY', 'STATE', 'DETAIL'], rows)}\n{verdict}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    )
