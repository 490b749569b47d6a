"""`orderflow health`: is the gateway up (`/healthz`), and can it work (`/readyz`: the broker, the
database and Temporal each answer it)?"""

from __future__ import annotations

from typing import TypedDict

import httpx

from services.cli import render
from services.cli.errors import fail
from services.cli.gateway import Gateway, error_detail

# /readyz answers with the checks either way: 200 when all passed, 503 when one failed
READINESS_ANSWERS = (httpx.codes.OK, httpx.codes.SERVICE_UNAVAILABLE)


class Check(TypedDict):
    ok: bool
    detail: str


class Health(TypedDict):
    gateway: str
    live: bool
    ready: bool
    checks: dict[str, Check]
    failed: list[str]


def gateway_health(gateway: Gateway) -> Health:
    """Whether the gateway is live and ready, and each dependency's check. An unreachable gateway,
    or an answer that is not its health, ends the command."""
    liveness = gateway.request("GET", "/healthz")
    if not liveness.is_success:
        fail(f"the gateway at {gateway.base_url} is not live: /healthz answered {answer(liveness)}")
    readiness = gateway.request("GET", "/readyz")
    if readiness.status_code not in READINESS_ANSWERS:
        fail(f"the gateway at {gateway.base_url} answered /readyz with {answer(readiness)}")
    try:
        checks = {
            name: Check(ok=bool(check["ok"]), detail=str(check["detail"]))
            for name, check in readiness.json()["checks"].items()
        }
    except (ValueError, LookupError, TypeError, AttributeError):  # not the Readiness schema
        fail(f"{gateway.base_url} is not an orderflow gateway: /readyz answered {readiness.text[:200]!r}")
    failed = [name for name, check in checks.items() if not check["ok"]]
    return Health(gateway=gateway.base_url, live=True, ready=not failed, checks=checks, failed=failed)


def answer(response: httpx.Response) -> str:
    return f"{response.status_code} {response.reason_phrase}: {error_detail(response)}"


def as_text(health: Health) -> str:
    rows = [["gateway", "live", health["gateway"]]]
    rows += [
        [name, "ok" if check["ok"] else "FAILED", check["detail"]] for name, check in health["checks"].items()
    ]
    verdict = "ready" if health["ready"] else f"not ready: {', '.join(health['failed'])}"
    return f"{render.table(['DEPENDENCY', 'STATE', 'DETAIL'], rows)}\n{verdict}"
