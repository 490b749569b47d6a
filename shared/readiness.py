"""The answer of a /readyz endpoint, free of I/O imports: the CLI reads it too."""

from __future__ import annotations

from pydantic import BaseModel, Field


class DependencyCheck(BaseModel):
    ok: bool
    detail: str


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, DependencyCheck]
    failed: list[str] = Field(description="Names of the dependencies that are not ready.")
