"""The REST gateway as the CLI sees it: JSON in and out, errors as readable messages."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn
from urllib.parse import quote

import httpx

from services.cli.errors import fail, reason

REQUEST_TIMEOUT_SECONDS = 15.0
Answer = dict[str, Any]
"""A gateway's answer: whatever JSON its response models write, which the CLI reads by key."""
Query = dict[str, str | int | None]
"""Query parameters; one that is None is left out."""
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

    def get(self, path: str, params: Query | None = None) -> Answer:
        # httpx would send a None parameter as an empty value
        present = {name: value for name, value in (params or {}).items() if value is not None}
        return answer_of(self.request("GET", path, params=present))

    def post(self, path: str, body: Mapping[str, object]) -> Answer:
        return answer_of(self.request("POST", path, body=body))

    def request(
        self,
        method: str,
        path: str,
        params: Mapping[str, str | int] | None = None,
        body: Mapping[str, object] | None = None,
    ) -> httpx.Response:
        """The gateway's response, whatever its status; an unreachable gateway ends the command."""
        try:
            with httpx.Client(
                base_url=self.base_url, headers=self.headers, timeout=REQUEST_TIMEOUT_SECONDS
            ) as client:
                return client.request(method, path, params=params, json=body)
        except httpx.HTTPError as error:
            fail(f"cannot reach the gateway at {self.base_url}: {reason(error)}")


def answer_of(response: httpx.Response) -> Answer:
    if response.is_error:
        refused(response)
    answer: Answer = response.json()
    return answer


def refused(response: httpx.Response) -> NoReturn:
    """Report an answer other than the one asked for, and exit."""
    detail = error_detail(response)
    if response.status_code == httpx.codes.UNAUTHORIZED and "Authorization" not in response.request.headers:
        detail = f"{detail} ({NO_TOKEN_HINT})"
    fail(f"the gateway answered {response.status_code} {response.reason_phrase}: {detail}")


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
