"""The REST gateway's FastAPI application, `create_app(settings)`, and its OpenAPI document."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI, status
from fastapi.exceptions import RequestValidationError
from pydantic.json_schema import models_json_schema

from services.api import codec, commands, dashboard, health, limits, orders, streams, telemetry
from services.api.auth import TokenVerifier
from services.api.connections import Connections
from services.api.errors import dependency_unavailable, method_not_allowed
from services.api.schemas import REQUEST_BODIES
from shared.json_schema import StrippedTextJsonSchema
from shared.probes import DependencyUnavailable
from shared.settings import Settings

DESCRIPTION = """
Place orders and steer their lifecycle over HTTP.

**Commands** (`POST`) are published to the RabbitMQ exchange `orders.commands` and answered
`202 Accepted` only once the broker has confirmed them; a `503` means nothing was published. When
more placements wait for admission than the system takes, `POST /orders` answers `503` with a
`Retry-After` header (the backlog is full): the order was refused, not accepted and then failed. A
command's effect is asynchronous: follow the order with `GET /orders/{order_id}` and its
`/events`. Retrying a command with the same `command_id` (or `Idempotency-Key` header) is safe.

**Queries** (`GET`) read the order's workflow (live status) and the orders and audit tables.

**Authorization**: every operation but the health probes needs an OAuth2 bearer token (a JWT access
token of the configured issuer: `Authorization: Bearer <token>`; under `make run`, `orderflow token
--role reviewer --subject rita` prints one; **Authorize** above takes it). Each operation lists the
roles it admits. A customer places orders and reads, cancels and re-addresses its own (another's
order is unknown to it: `404`); a reviewer reads every order, approves (never one it placed) and
cancels orders in review; an operator does everything. No or a bad token: `401`; a token without
the role: `403`.

**Errors** answer `{"detail": "<what went wrong>"}`, except a `422`, whose `detail` lists the
invalid fields (`loc`, `msg`, `type`). Each operation documents the errors it can answer with.
"""
TAGS = [
    {"name": "commands", "description": "Publish commands; answered once the broker confirmed them."},
    {"name": "orders", "description": "An order's status, its history, and the list of orders."},
    {"name": "health", "description": "Liveness and readiness probes."},
    {"name": "codec", "description": "Temporal's remote codec for its UI and CLI (operators only)."},
]


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(
        title="orderflow REST gateway",
        version="0.1.0",
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=lifespan,
        # FastAPI traces requests by itself once a tracer provider is installed (shared/tracing.py)
        telemetry={"exclude": lambda scope: scope.get("path") in telemetry.UNTRACED_PATHS},
    )
    app.openapi = partial(openapi_document, app)  # type: ignore[method-assign]
    app.state.settings = settings
    for routes in (commands, orders, health, streams, dashboard, telemetry, codec):
        app.include_router(routes.router)
    app.add_middleware(telemetry.HttpMetrics)
    app.add_middleware(codec.CodecCors, origins=settings.codec_cors_origins)
    # outermost: an oversized body is refused before any other layer reads it
    app.add_middleware(limits.BodySizeLimit, max_bytes=settings.api_max_body_bytes)
    app.state.write_limit = limits.WriteRateLimit(settings.api_write_rate_limit)
    app.state.stream_slots = limits.StreamSlots(settings.api_max_streams_per_caller)
    app.add_exception_handler(RequestValidationError, limits.validation_error)
    app.add_exception_handler(DependencyUnavailable, dependency_unavailable)
    app.add_exception_handler(status.HTTP_405_METHOD_NOT_ALLOWED, method_not_allowed)
    return app


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Trusts the configured token issuers and holds the connections while the app runs."""
    app.state.token_verifier = TokenVerifier.from_settings(app.state.settings)
    app.state.connections = await Connections.open(app.state.settings)
    try:
        yield
    finally:
        await app.state.connections.close()


def openapi_document(app: FastAPI) -> dict[str, Any]:  # an OpenAPI document: JSON of any shape
    """FastAPI's document, made once, its request bodies described as `StrippedTextJsonSchema` checks them."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    document = FastAPI.openapi(app)  # kept as `app.openapi_schema`, completed below
    _, bodies = models_json_schema(
        [(model, "validation") for model in REQUEST_BODIES],
        ref_template="#/components/schemas/{model}",
        schema_generator=StrippedTextJsonSchema,
    )
    components = document["components"]["schemas"]
    renamed = bodies["$defs"].keys() - components.keys()
    if renamed:  # FastAPI named a schema otherwise (an input and output variant, say)
        raise RuntimeError(f"request body schemas missing from the OpenAPI document: {renamed}")
    components.update(bodies["$defs"])
    return document
