"""The dashboard: its figures (`GET /stats`) and its files against a gateway process, and the page
itself in headless Chromium (Debian's `chromium`, driven by Playwright) against the whole system.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, async_playwright, expect
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api_support import (
    insert_events,
    insert_order,
    order_body,
    running_system,
    unique_id,
)
from shared.admissions import AdmissionStatus
from shared.contracts import EventType, OrderState
from shared.db import Admission, transaction
from shared.settings import Settings

LIFECYCLE_TIMEOUT_MS = 60_000  # generous: the real fault injector runs, on a busy machine


async def stats(gateway_url: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{gateway_url}/stats")
    assert response.status_code == 200, response.text
    figures: dict[str, Any] = response.json()
    return figures


async def admit(sessions: async_sessionmaker[AsyncSession], status: AdmissionStatus) -> None:
    async with transaction(sessions) as session:
        session.add(Admission(order_id=unique_id("adm"), status=status.value))


# --- the figures and the files --------------------------------------------------------------------
async def test_stats_count_orders_per_state_admissions_and_completions(
    gateway_url: str, base_settings: Settings, db_sessions: async_sessionmaker[AsyncSession]
) -> None:
    # completed five minutes ago: a minute in the middle of the window, whenever the figures are read
    five_minutes_ago = datetime.now(UTC) - timedelta(minutes=5)
    minute = five_minutes_ago.replace(second=0, microsecond=0)
    before = await stats(gateway_url)
    for state in (OrderState.QUEUED, OrderState.QUEUED, OrderState.AWAITING_APPROVAL):
        await insert_order(db_sessions, unique_id("stats"), state)
    await insert_order(db_sessions, unique_id("stats"), OrderState.COMPLETED, five_minutes_ago)
    for status in (AdmissionStatus.WAITING, AdmissionStatus.WAITING, AdmissionStatus.RUNNING):
        await admit(db_sessions, status)
    await insert_events(db_sessions, unique_id("stats"), {1: EventType.RECEIVED})

    after = await stats(gateway_url)

    grown = {state: after["counts"][state] - before["counts"][state] for state in after["counts"]}
    assert {state: count for state, count in grown.items() if count} == {
        "queued": 2,
        "awaiting_approval": 1,
        "completed": 1,
    }
    assert set(after["counts"]) == {state.value for state in OrderState}
    assert after["total"] - before["total"] == 4
    assert after["admission"]["backlog"] - before["admission"]["backlog"] == 2
    assert after["admission"]["running"] - before["admission"]["running"] == 1
    assert after["admission"]["max_running"] == base_settings.max_running_lifecycles
    assert len(after["completed_per_minute"]) == 10
    assert completed_in(after, minute) - completed_in(before, minute) == 1
    assert after["position"] > before["position"]


def completed_in(figures: dict[str, Any], minute: datetime) -> int:
    [count] = [
        each["count"]
        for each in figures["completed_per_minute"]
        if datetime.fromisoformat(each["minute"]) == minute
    ]
    return int(count)


async def test_the_dashboard_is_a_page_a_script_and_a_style_sheet(gateway_url: str) -> None:
    async with httpx.AsyncClient(base_url=gateway_url) as client:
        page = await client.get("/dashboard")
        script = await client.get("/dashboard/static/dashboard.js")
        style = await client.get("/dashboard/static/dashboard.css")
        spec = (await client.get("/openapi.json")).json()

    assert page.headers["content-type"].startswith("text/html")
    assert '<script src="/dashboard/static/dashboard.js"' in page.text
    assert script.headers["content-type"].startswith("text/javascript")
    assert "new EventSource(" in script.text
    assert style.headers["content-type"].startswith("text/css")
    assert "/stats" in spec["paths"] and "/dashboard" not in spec["paths"]


# --- the page in a browser, against the whole system ---------------------------------------------
@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def system(settings: Settings, migrated_database: str) -> AsyncIterator[Settings]:
    async with running_system(settings, "dashboard") as system_settings:
        yield system_settings


@pytest_asyncio.fixture(loop_scope="session")
async def browser() -> AsyncIterator[Browser]:
    """Headless Chromium: Debian's package (`.ci/run` installs it), not a download of Playwright's."""
    chromium = shutil.which("chromium")
    assert chromium, "no chromium on PATH: apt-get install chromium"
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=chromium)
        yield launched
        await launched.close()


@pytest.mark.e2e
async def test_the_dashboard_follows_an_order_live_and_approves_it(
    system: Settings, browser: Browser, tmp_path: Path
) -> None:
    page = await browser.new_page(viewport={"width": 1400, "height": 900})
    await page.goto(f"{system.api_url}/dashboard")
    await expect(page.locator("#live")).to_have_text("live")
    await page.evaluate("window.loadedOnce = true")  # gone if the page were loaded again

    order_id = unique_id("browser")
    async with httpx.AsyncClient(base_url=system.api_url) as client:
        placed = await client.post("/orders", json=order_body(order_id=order_id))
    assert placed.status_code == 202, placed.text

    row = page.locator(f'#orders tbody tr[data-order-id="{order_id}"]')
    await expect(row).to_be_visible(timeout=LIFECYCLE_TIMEOUT_MS)  # it appears, live
    await row.click()
    await expect(page.locator("#detail-state")).to_have_text(
        "awaiting_approval", timeout=LIFECYCLE_TIMEOUT_MS
    )
    await page.click("#approve")
    await expect(page.locator("#action-result")).to_have_text("ApproveOrder accepted")

    await expect(row.locator("td.state")).to_have_text("completed", timeout=LIFECYCLE_TIMEOUT_MS)
    await expect(page.locator("#detail-state")).to_have_text("completed", timeout=LIFECYCLE_TIMEOUT_MS)
    timeline = await page.locator("#timeline li").evaluate_all(
        "items => items.map(item => item.dataset.type)"
    )
    steps = [
        "received",
        "validated",
        "awaiting_approval",
        "approved",
        "payment_charged",
        "shipped",
        "completed",
    ]
    assert [kind for kind in timeline if kind in steps] == steps
    await expect(page.locator("#approve")).to_be_disabled()
    assert await page.evaluate("window.loadedOnce") is True

    await show_only(page, "completed")
    states = await page.locator("#orders tbody td.state").all_text_contents()
    assert states and set(states) == {"completed"}
    await expect(row).to_be_visible()

    screenshot = tmp_path / "dashboard.png"
    await page.screenshot(path=str(screenshot), full_page=True)
    print(f"dashboard screenshot: {screenshot}")


async def show_only(page: Page, state: str) -> None:
    """Filter the list by a state, and wait until it shows that state only."""
    await page.click(f'#states .chip[data-state="{state}"]')
    await expect(page.locator(f'#states .chip[data-state="{state}"]')).to_have_attribute(
        "aria-pressed", "true"
    )
    await expect(page.locator("#orders tbody td.state").filter(has_not_text=state)).to_have_count(0)
