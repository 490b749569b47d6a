"""The REST gateway as the CLI sees it: JSON in and out, errors as readable messages."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn, cast
from urllib.parse import quote

import httpx
from pydantic import ValidationError

from services.cli.errors import fail, reason
from shared.readiness import Readiness

REQUEST_TIMEOUT_SECONDS = 15.0
Answer = dict[str, Any]  # whatever JSON the gateway's response models write, read by key
NO_TOKEN_HINT = "no token was sent: give --token, set ORDERFLOW_TOKEN or run `orderflow login`"


def order_path(order_id: str, action: str = "") -> str:
    """The path of an order (quoted: an id is user input) and, optionally, one of its actions."""
    path = f"/orders/{quote(order_id, safe='')}"
    return f"{path}/{action}" if action else path


class Gateway:
    def __init__(self, base_url: str, token: str | None) -> None:
        self.base_url = base_url.rstrip("/")
        # without a token the gateway answers 401, which `refused` explains
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def request(
        self, method: str, path: str, params: Mapping[str, object] | None = None, body: object = None
    ) -> httpx.Response:
        """The gateway's response, whatever its status; an unreachable gateway ends the command."""
        # httpx would send a None parameter as an empty value
        present = {name: str(value) for name, value in (params or {}).items() if value is not None}
        try:
            return httpx.request(
                method,
                self.base_url + path,
                params=present,
                json=body,
                headers=self.headers,
                timeout=REQUEST_TIMEOUT_SECONDS,
            )
        except httpx.HTTPError as error:
            fail(f"cannot reach the gateway at {self.base_url}: {reason(error)}")

    def answer(
        self, method: str, path: str, params: Mapping[str, object] | None = None, body: object = None
    ) -> Answer:
        """The answer asked for; any other ends the command."""
        response = self.request(method, path, params, body)
        if response.is_error:
            refused(response)
        return cast(Answer, response.json())

    def health(self) -> Answer:
        """Whether the gateway is live (/healthz) and ready (/readyz), and each dependency's check."""
        liveness = self.request("GET", "/healthz")
        if not liveness.is_success:
            fail(f"the gateway at {self.base_url} is not live: /healthz answered {described(liveness)}")
        readiness = self.request("GET", "/readyz")
        # /readyz answers with the checks either way: 200 when all passed, 503 when one failed
        if readiness.status_code not in (httpx.codes.OK, httpx.codes.SERVICE_UNAVAILABLE):
            fail(f"the gateway at {self.base_url} answered /readyz with {described(readiness)}")
        try:
            answer = Readiness.model_validate_json(readiness.content)
        except ValidationError:
            fail(f"{self.base_url} is not an orderflow gateway: /readyz answered {readiness.text[:200]!r}")
        return {"gateway": self.base_url, "live": True, **answer.model_dump()}


def refused(response: httpx.Response) -> NoReturn:
    """Report an answer other than the one asked for, and exit."""
    unauthorized = response.status_code == httpx.codes.UNAUTHORIZED
    hint = f" ({NO_TOKEN_HINT})" if unauthorized and "Authorization" not in response.request.headers else ""
    fail(f"the gateway answered {described(response)}{hint}")


def described(response: httpx.Response) -> str:
    return f"{response.status_code} {response.reason_phrase}: {error_detail(response)}"


def error_detail(response: httpx.Response) -> str:
    """FastAPI's `detail`: a sentence, or a list of validation errors shown one per line."""
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        return response.text or "(no detail)"
    if isinstance(detail, list):
        return "".join(f"\n  {error_location(error.get('loc', []))}: {error.get('msg')}" for error in detail)
    return str(detail)


def error_location(loc: list[str | int]) -> str:
    """`['body', 'address', 'country']` -> `address.country` (where the value came from is implied)."""
    return ".".join(str(part) for part in (loc[1:] or loc))
