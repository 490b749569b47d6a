"""`orderflow health`: is the gateway up (`/healthz`), and can it work (`/readyz`: the broker, the
database and Temporal each answer it)?"""

from __future__ import annotations

import httpx

from services.cli import render
from services.cli.errors import fail, reason
from services.cli.gateway import REQUEST_TIMEOUT_SECONDS, Answer, error_detail

# /readyz answers with the checks either way: 200 when all passed, 503 when one failed
READINESS_ANSWERS = (httpx.codes.OK, httpx.codes.SERVICE_UNAVAILABLE)


def gateway_health(base_url: str) -> Answer:
    """`gateway`, `live`, `ready`, each dependency's check (`ok`, `detail`) and the `failed` ones.
    An unreachable gateway, or an answer that is not its health, ends the command (`fail`)."""
    base_url = base_url.rstrip("/")
    try:
        with httpx.Client(base_url=base_url, timeout=REQUEST_TIMEOUT_SECONDS) as client:
            liveness = client.get("/healthz")
            readiness = client.get("/readyz") if liveness.is_success else None
    except httpx.HTTPError as error:
        fail(f"cannot reach the gateway at {base_url}: {reason(error)}")
    if readiness is None:
        fail(f"the gateway at {base_url} is not live: /healthz answered {answer(liveness)}")
    if readiness.status_code not in READINESS_ANSWERS:
        fail(f"the gateway at {base_url} answered /readyz with {answer(readiness)}")
    try:
        checks = {
            name: {"ok": bool(check["ok"]), "detail": str(check["detail"])}
            for name, check in readiness.json()["checks"].items()
        }
    except (ValueError, LookupError, TypeError, AttributeError):  # not the Readiness schema
        fail(f"{base_url} is not an orderflow gateway: /readyz answered {readiness.text[:200]!r}")
    failed = [name for name, check in checks.items() if not check["ok"]]
    return {"gateway": base_url, "live": True, "ready": not failed, "checks": checks, "failed": failed}


def answer(response: httpx.Response) -> str:
    return f"{response.status_code} {response.reason_phrase}: {error_detail(response)}"


def as_text(health: Answer) -> str:
    rows = [["gateway", "live", health["gateway"]]]
    rows += [
        [name, "ok" if check["ok"] else "FAILED", check["detail"]] for name, check in health["checks"].items()
    ]
    verdict = "ready" if health["ready"] else f"not ready: {', '.join(health['failed'])}"
    return f"{render.table(['DEPENDENCY', 'STATE', 'DETAIL'], rows)}\n{verdict}"
