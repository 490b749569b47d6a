"""Human-readable text for the gateway's answers (`--json` prints them as they are)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


def accepted(answer: dict[str, Any]) -> str:
    return (
        f"accepted: {answer['type']} for order {answer['order_id']} (command {answer['command_id']})\n"
        f"follow it: orderflow status {answer['order_id']}"
    )


def order_status(status: dict[str, Any]) -> str:
    source = "its workflow" if status["source"] == "workflow" else "the orders table"
    step = f", step {status['step']}" if status.get("step") else ""
    rows = [
        ("payment", status["payment_id"]),
        ("address", address(status["address"])),
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


def order_page(page: dict[str, Any]) -> str:
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


def history(answer: dict[str, Any]) -> str:
    if not answer["events"]:
        return f"order {answer['order_id']} has no events yet"
    return "\n".join(event(item) for item in answer["events"])


def event(item: dict[str, Any]) -> str:
    data = f"  {json.dumps(item['data'], sort_keys=True)}" if item.get("data") else ""
    return f"{item['occurred_at']}  #{item['seq']:<3} {item['order_id']}  {item['type']}{data}"


def address(fields: dict[str, Any]) -> str:
    parts = ("name", "line1", "line2", "city", "region", "postal_code", "country")
    return ", ".join(str(fields[part]) for part in parts if fields.get(part))


def step_error(error: dict[str, Any]) -> str:
    return f"{error['step']} attempt {error['attempt']} at {error['at']}: {error['error']}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    )
