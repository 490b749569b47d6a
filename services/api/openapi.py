"""The gateway's OpenAPI document: FastAPI's, with the request bodies described as they are checked
(see `shared.json_schema`)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from services.api.schemas import REQUEST_BODIES
from shared.json_schema import StrippedTextJsonSchema

COMPONENT_REF = "#/components/schemas/{model}"


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """The app's document, made once: FastAPI's, its request bodies described by
    `StrippedTextJsonSchema` (the responses carry stripped text, which the patterns allow too)."""
    if app.openapi_schema is None:
        document = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
            tags=app.openapi_tags,
        )
        _, bodies = models_json_schema(
            [(model, "validation") for model in REQUEST_BODIES],
            ref_template=COMPONENT_REF,
            schema_generator=StrippedTextJsonSchema,
        )
        components = document["components"]["schemas"]
        renamed = bodies["$defs"].keys() - components.keys()
        if renamed:  # FastAPI named a schema otherwise (an input and output variant, say)
            raise RuntimeError(f"request body schemas missing from the OpenAPI document: {renamed}")
        components.update(bodies["$defs"])
        app.openapi_schema = document
    return app.openapi_schema
