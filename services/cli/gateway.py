"""The REST gateway as the CLI sees it: JSON in and out, errors as readable messages."""

from __future__ import annotations

from typing import Any, Literal, overload
from urllib.parse import quote

import httpx

from services.cli.errors import fail, reason

REQUEST_TIMEOUT_SECONDS = 15.0


def order_path(order_id: str, action: str = "") -> str:
    """The path of an order (quoted: an id is user input) and, optionally, one of its actions."""
    path = f"/orders/{quote(order_id, safe='')}"
    return f"{path}/{action}" if action else path


class Gateway:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")

    def get(self, path: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        # httpx would send a None parameter as an empty value
        present = {name: value for name, value in (params or {}).items() if value is not None}
        return self._request("GET", path, params=present)

    def get_if_known(self, path: str) -> dict[str, Any] | None:
        """Like `get`, but None where the gateway does not know the resource (404)."""
        return self._request("GET", path, missing_ok=True)

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", path, json=body)

    @overload
    def _request(
        self, method: str, path: str, *, missing_ok: Literal[True], **options: Any
    ) -> dict[str, Any] | None: ...

    @overload
    def _request(self, method: str, path: str, **options: Any) -> dict[str, Any]: ...

    def _request(
        self, method: str, path: str, *, missing_ok: bool = False, **options: Any
    ) -> dict[str, Any] | None:
        try:
            with httpx.Client(base_url=self.base_url, timeout=REQUEST_TIMEOUT_SECONDS) as client:
                response = client.request(method, path, **options)
        except httpx.HTTPError as error:
            fail(f"cannot reach the gateway at {self.base_url}: {reason(error)}")
        if missing_ok and response.status_code == httpx.codes.NOT_FOUND:
            return None
        if response.is_error:
            answer = f"{response.status_code} {response.reason_phrase}"
            fail(f"the gateway answered {answer}: {error_detail(response)}")
        body: dict[str, Any] = response.json()
        return body


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
    return ".".join(str(part) for part in (loc[1:] if len(loc) > 1 else loc))
