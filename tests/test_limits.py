"""The gateway's abuse limits: body size (413 before parsing), write rate per caller (429 with
Retry-After), event streams per caller (429), and 422s that do not echo oversized input."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.contracts import Role
from shared.settings import Settings
from testsupport.gateway import bearer, gateway, gateway_process
from testsupport.orders import order_body


async def test_a_body_over_the_limit_is_refused_before_it_is_parsed(settings: Settings) -> None:
    limited = settings.model_copy(update={"api_max_body_bytes": 2048})
    async with gateway(limited, bearer(limited, "cora", Role.CUSTOMER)) as client:
        # not even JSON: a parse would answer 400 or 422, the limit answers first
        declared = await client.post(
            "/orders", content=b"{" * 4096, headers={"content-type": "application/json"}
        )
        assert declared.status_code == httpx.codes.REQUEST_ENTITY_TOO_LARGE
        assert "2048 bytes" in declared.json()["detail"]

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
            for _ in range(8):
                yield b" " * 512

        chunked = await client.post("/orders", content=chunks(), headers={"content-type": "application/json"})
        assert chunked.status_code == httpx.codes.REQUEST_ENTITY_TOO_LARGE

        within = await client.post("/orders", json=order_body(payment_id="x" * 100))
        assert within.status_code == httpx.codes.UNPROCESSABLE_ENTITY  # parsed: too long an id


async def test_writes_beyond_a_callers_rate_get_429_with_retry_after(
    settings: Settings, db_sessions: async_sessionmaker[AsyncSession]
) -> None:
    limited = settings.model_copy(update={"api_write_rate_limit": "2/minute"})
    async with gateway(limited) as client:
        cora = bearer(limited, "cora", Role.CUSTOMER)
        answers = [
            (await client.post("/orders", json=order_body(), headers=cora)).status_code for _ in range(3)
        ]
        assert answers == [httpx.codes.ACCEPTED, httpx.codes.ACCEPTED, httpx.codes.TOO_MANY_REQUESTS]

        refused = await client.post("/orders", json=order_body(), headers=cora)
        assert refused.status_code == httpx.codes.TOO_MANY_REQUESTS
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert "2 per 1 minute" in refused.json()["detail"]

        # another caller has a rate of its own; reads are not counted
        other = await client.post(
            "/orders", json=order_body(), headers=bearer(limited, "olga", Role.CUSTOMER)
        )
        assert other.status_code == httpx.codes.ACCEPTED
        assert (await client.get("/orders", headers=cora)).status_code == httpx.codes.OK


async def test_a_validation_error_does_not_echo_an_oversized_input(settings: Settings) -> None:
    async with gateway(settings, bearer(settings, "cora", Role.CUSTOMER)) as client:
        huge = "y" * 20_000
        answer = await client.post("/orders", json=order_body(payment_id=huge))
        small = await client.post("/orders", json=order_body(payment_id="a b"))

    assert answer.status_code == httpx.codes.UNPROCESSABLE_ENTITY
    assert huge[:300] not in answer.text
    assert len(answer.content) < 2000
    assert answer.json()["detail"][0]["loc"] == ["body", "payment_id"]
    # a small input is still shown, to say what was wrong with it
    assert small.json()["detail"][0]["input"] == "a b"


def test_event_streams_per_caller_are_capped(
    settings: Settings, db_sessions: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    capped = settings.model_copy(update={"api_max_streams_per_caller": 1})
    with gateway_process(capped, tmp_path / "gateway.log") as url, httpx.Client(base_url=url) as client:
        rita = bearer(capped, "rita", Role.REVIEWER)
        with client.stream("GET", "/events/stream", headers=rita) as first:
            assert first.status_code == httpx.codes.OK
            second = client.get("/events/stream", headers=rita)
            assert second.status_code == httpx.codes.TOO_MANY_REQUESTS
            assert second.headers["Retry-After"]
            others = client.get("/events/stream?timeout=1", headers=bearer(capped, "otto", Role.OPERATOR))
            assert others.status_code == httpx.codes.OK
        # the first stream's end gave its slot back
        again = client.get("/events/stream?timeout=1", headers=rita)
        assert again.status_code == httpx.codes.OK
