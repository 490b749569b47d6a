"""The gateway's error answers, `ErrorMessage` (`{"detail": "a sentence"}`) but for a 422's list of
invalid fields, and their entries in the operations' OpenAPI `responses`."""

from __future__ import annotations

from fastapi import Request, status
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import compile_path

from services.api.schemas import ErrorMessage

# an operation's `responses`: status -> its OpenAPI entry (FastAPI's keys: model, description, ...)
Responses = dict[int | str, dict[str, object]]

# the broker and Temporal are reconnected on the next request that needs them
DEPENDENCY_RETRY_AFTER_SECONDS = 5

RETRY_AFTER_HEADER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "required": True,
        "schema": {"type": "integer"},
    }
}


def documented_error(description: str, *, retry_after: bool = False) -> dict[str, object]:
    """An error answer as an operation's `responses` entry: its `ErrorMessage` body and headers."""
    headers = {"headers": RETRY_AFTER_HEADER} if retry_after else {}
    return {"model": ErrorMessage, "description": description, **headers}


def json_error(description: str) -> dict[str, object]:
    """`documented_error` for a route of another media type (an event stream's errors are JSON)."""
    schema = {"$ref": "#/components/schemas/ErrorMessage"}  # put there by other routes' `documented_error`
    return {"description": description, "content": {"application/json": {"schema": schema}}}


# FastAPI answers a JSON syntax error with a 422, but a body it cannot even decode with a 400
UNREADABLE_BODY: Responses = {
    status.HTTP_400_BAD_REQUEST: documented_error(
        "The body cannot be read as JSON: it is not UTF-8 text, or it is nested too deeply."
    )
}


async def dependency_unavailable(_: Request, error: Exception) -> JSONResponse:
    retry_after = {"Retry-After": str(DEPENDENCY_RETRY_AFTER_SECONDS)}
    return JSONResponse({"detail": str(error)}, status.HTTP_503_SERVICE_UNAVAILABLE, retry_after)


async def method_not_allowed(request: Request, error: Exception) -> JSONResponse:
    """A 405 allowing all methods of the path (Starlette's: the first matching route's; `/orders` has 2)."""
    assert isinstance(error, HTTPException)
    allowed = set(error.headers["Allow"].split(", ") if error.headers else ())
    for template, operations in request.app.openapi()["paths"].items():
        if compile_path(template)[0].match(request.url.path):
            allowed |= {method.upper() for method in operations}
            break
    allow = ", ".join(sorted(allowed))
    detail = f"{request.method} is not allowed here; allowed: {allow}"
    return JSONResponse({"detail": detail}, status.HTTP_405_METHOD_NOT_ALLOWED, {"Allow": allow})
