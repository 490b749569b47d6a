"""The dashboard: its figures (`GET /stats`) and its files against a gateway process, and the page
itself in headless Chromium (Debian's `chromium`, driven by Playwright): against a gateway and rows
of the read model, an order found by its id, its events as fields, its link to the Temporal UI and a
layout whose parts never overlap, on screens from a phone's to a desktop's; against the whole
system, signed in with a token (from a `orderflow token --link` link, or pasted), the buttons of its
role, a cancel only once confirmed, and a cross-site form post that changes nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from itertools import combinations
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest
import pytest_asyncio
from playwright.async_api import Browser, FloatRect, Page, ViewportSize, async_playwright, expect
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from typer.testing import CliRunner

from services.cli.main import app as cli
from shared.admission_table import AdmissionStatus
from shared.contracts import EventType, OrderState, Role
from shared.db import Admission, transaction
from shared.lifecycle import order_workflow_id
from shared.settings import Settings
from testsupport.gateway import bearer, serving_page
from testsupport.orders import order_body, unique_id
from testsupport.polling import eventually
from testsupport.read_model import insert_events, insert_order

LIFECYCLE_TIMEOUT_MS = 60_000  # generous: the real fault injector runs, on a busy machine


async def stats(gateway_url: str, settings: Settings) -> dict[str, Any]:
    async with httpx.AsyncClient(headers=bearer(settings, "rita", Role.REVIEWER)) as client:
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
    before = await stats(gateway_url, base_settings)
    for state in (OrderState.QUEUED, OrderState.QUEUED, OrderState.AWAITING_APPROVAL):
        await insert_order(db_sessions, unique_id("stats"), state)
    await insert_order(db_sessions, unique_id("stats"), OrderState.COMPLETED, five_minutes_ago)
    for status in (AdmissionStatus.WAITING, AdmissionStatus.WAITING, AdmissionStatus.RUNNING):
        await admit(db_sessions, status)
    await insert_events(db_sessions, unique_id("stats"), {1: EventType.RECEIVED})

    after = await stats(gateway_url, base_settings)

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


async def test_the_dashboard_is_a_page_a_script_and_a_style_sheet(
    gateway_url: str, settings: Settings
) -> None:
    # no token: the page is its own sign-in page, and holds no data
    async with httpx.AsyncClient(base_url=gateway_url) as client:
        page = await client.get("/dashboard")
        script = await client.get("/dashboard/static/dashboard.js")
        style = await client.get("/dashboard/static/dashboard.css")
        spec = (await client.get("/openapi.json")).json()

    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert '<script src="/dashboard/static/dashboard.js"' in page.text
    assert "<script>" not in page.text  # no inline script: the policy allows none
    assert '<meta name="orderflow-roles-claim" content="roles">' in page.text
    workflows = f"{settings.temporal_ui_url}/namespaces/{settings.temporal_namespace}/workflows"
    assert f'<meta name="orderflow-workflow-url" content="{workflows}/order-{{order_id}}">' in page.text
    policy = dict(rule.split(" ", 1) for rule in page.headers["content-security-policy"].split("; "))
    assert (policy["default-src"], policy["script-src"], policy["connect-src"]) == (
        "'none'",
        "'self'",
        "'self'",
    )
    assert (policy["frame-ancestors"], policy["form-action"]) == ("'none'", "'none'")
    assert page.headers["referrer-policy"] == "no-referrer"
    assert script.headers["content-type"].startswith("text/javascript")
    # EventSource cannot send the token: the streams are read with fetch()
    assert "new EventSource(" not in script.text and "authorization: `Bearer " in script.text
    assert style.headers["content-type"].startswith("text/css")
    assert "/stats" in spec["paths"] and "/dashboard" not in spec["paths"]


async def test_the_figures_are_for_reviewers_and_operators(gateway_url: str, base_settings: Settings) -> None:
    async with httpx.AsyncClient(base_url=gateway_url) as client:
        anonymous = await client.get("/stats")
        customer = await client.get("/stats", headers=bearer(base_settings, "cleo", Role.CUSTOMER))
        operator = await client.get("/stats", headers=bearer(base_settings, "olga", Role.OPERATOR))

    assert (anonymous.status_code, customer.status_code, operator.status_code) == (401, 403, 200)
    assert anonymous.headers["www-authenticate"].startswith("Bearer")


# --- the page in a browser -----------------------------------------------------------------------
@pytest_asyncio.fixture(loop_scope="session")
async def browser(chromium: str) -> AsyncIterator[Browser]:
    """Headless Chromium (or Chrome) of the machine's (`.ci/run` installs Debian's), not a download of
    Playwright's."""
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=chromium)
        yield launched
        await launched.close()


# against a gateway and rows of the read model
PHONE = "phone"
SCREENS: dict[str, ViewportSize] = {
    PHONE: {"width": 390, "height": 844},
    "laptop": {"width": 1280, "height": 800},
    "desktop": {"width": 1400, "height": 900},
    "full HD": {"width": 1920, "height": 1080},
}
ALL_COLUMNS = ["Order", "State", "Amount", "Created", "Updated"]
# an order waiting for its reviewer whose address was changed: the longest state in the list, an
# address in the timeline
IN_REVIEW_WITH_NEW_ADDRESS = (
    EventType.QUEUED,
    EventType.ADMITTED,
    EventType.RECEIVED,
    EventType.VALIDATED,
    EventType.ADDRESS_UPDATED,
    EventType.AWAITING_APPROVAL,
)
LONG_ORDER_ID = 60  # ids go up to 64 characters; `insert_order` makes its payment id `pay-<order id>`
PIXEL = 0.5  # what rounding may leave between boxes that touch


@pytest_asyncio.fixture(loop_scope="session")
async def order_in_review(db_sessions: async_sessionmaker[AsyncSession]) -> str:
    """An order with a long id, in review, with its events; its id."""
    order_id = unique_id("review-" + "w" * 40)
    assert len(order_id) == LONG_ORDER_ID
    await insert_order(db_sessions, order_id, OrderState.AWAITING_APPROVAL)
    await insert_events(
        db_sessions, order_id, dict(enumerate(IN_REVIEW_WITH_NEW_ADDRESS, start=1)), example_data=True
    )
    return order_id


async def signed_in(browser: Browser, gateway_url: str, settings: Settings, subject: str, role: Role) -> Page:
    """A page of the dashboard, signed in as `subject` with `role` by a link, once it is live."""
    token = bearer(settings, subject, role)["Authorization"].removeprefix("Bearer ")
    page = await browser.new_page(viewport=SCREENS["desktop"], timezone_id="UTC", locale="en-GB")
    await page.goto(f"{gateway_url}/dashboard#token={token}")
    await expect(page.locator("#live")).to_have_text("live")
    return page


async def find(page: Page, order_id: str) -> None:
    await page.fill("#find-id", order_id)
    await page.click("#find button[type=submit]")


async def test_an_order_is_found_by_its_id_with_its_events_as_fields_and_its_workflow_linked(
    browser: Browser, gateway_url: str, settings: Settings, order_in_review: str
) -> None:
    page = await signed_in(browser, gateway_url, settings, "olga", Role.OPERATOR)

    await find(page, "no-such-order")
    await expect(page.locator("#find-message")).to_have_text("No order no-such-order.")
    await expect(page.locator("#detail")).to_be_hidden()

    await find(page, order_in_review)
    await expect(page.locator("#find-message")).to_have_text("")
    await expect(page.locator("#detail-id")).to_have_text(order_in_review)
    await expect(page.locator("#detail-state")).to_have_text("awaiting_approval")
    workflow = f"{settings.temporal_ui_url}/namespaces/{settings.temporal_namespace}/workflows"
    link = page.locator("#workflow-link")
    await expect(link).to_have_attribute("href", f"{workflow}/{order_workflow_id(order_in_review)}")
    await expect(link).to_have_attribute("target", "_blank")

    timeline = page.locator("#timeline li")
    await expect(timeline).to_have_count(len(IN_REVIEW_WITH_NEW_ADDRESS))
    # times as the page's clock reads them (UTC here), numbers as they are, an address on one line
    assert await fields_of(page, "queued") == {"queued at": "12:00:00", "placed by": "alice"}
    assert await fields_of(page, "admitted") == {"queued at": "12:00:00", "admission wait seconds": "0.25"}
    assert await fields_of(page, "address_updated") == {
        "address": "Ada Lovelace, 12 St James's Square, London, SW1Y 4JH, GB"
    }
    assert await fields_of(page, "awaiting_approval") == {"review window seconds": "300"}
    assert await fields_of(page, "validated") == {}
    assert "{" not in await page.locator("#timeline").inner_text()  # no raw JSON


async def test_the_list_and_the_order_never_overlap_from_a_phone_to_a_desktop(
    browser: Browser, gateway_url: str, settings: Settings, order_in_review: str
) -> None:
    page = await signed_in(browser, gateway_url, settings, "olga", Role.OPERATOR)
    await find(page, order_in_review)
    await expect(page.locator("#timeline li")).to_have_count(len(IN_REVIEW_WITH_NEW_ADDRESS))
    await expect(page.locator(f'#orders tbody tr[data-order-id="{order_in_review}"]')).to_be_visible()

    for screen, size in SCREENS.items():
        await page.set_viewport_size(size)
        await page.evaluate("window.scrollTo(0, 0)")
        layout = await layout_of(page)
        assert layout.page_width <= size["width"], f"{screen}: the page scrolls sideways"
        assert layout.panel_overflow == 0, f"{screen}: the order's panel scrolls sideways"
        assert not overlap(layout.list, layout.panel), f"{screen}: the panel lies over the list"
        for name, column in layout.columns.items():
            assert within_width(column, layout.list), f"{screen}: {name} sticks out of the list"
            assert not overlap(column, layout.panel), f"{screen}: the panel lies over {name}"
        for (name, column), (other_name, other) in combinations(layout.columns.items(), 2):
            assert not overlap(column, other), f"{screen}: {name} and {other_name} overlap"
        if screen == PHONE:  # the panel under the list, which leaves out when orders were created
            assert list(layout.columns) == [name for name in ALL_COLUMNS if name != "Created"]
            assert layout.panel["y"] >= layout.list["y"] + layout.list["height"]
        else:
            assert list(layout.columns) == ALL_COLUMNS, screen
            assert layout.panel["x"] >= right_of(layout.list), f"{screen}: the panel is not beside the list"


class Layout(NamedTuple):
    list: FloatRect
    columns: dict[str, FloatRect]  # those shown, by their headings
    panel: FloatRect
    page_width: int
    panel_overflow: int


async def layout_of(page: Page) -> Layout:
    """Where the list, its columns and the order's panel are, and whether anything is too wide."""
    headings = page.locator("#orders th")
    names = await headings.all_text_contents()
    boxes = [await heading.bounding_box() for heading in await headings.all()]
    return Layout(
        list=await box_of(page, "section.orders"),
        columns={name: box for name, box in zip(names, boxes, strict=True) if box is not None},
        panel=await box_of(page, "#detail"),
        page_width=await page.evaluate("document.documentElement.scrollWidth"),
        panel_overflow=await page.locator("#detail").evaluate(
            "aside => aside.scrollWidth - aside.clientWidth"
        ),
    )


async def box_of(page: Page, selector: str) -> FloatRect:
    box = await page.locator(selector).bounding_box()
    assert box is not None, f"{selector} is not shown"
    return box


def right_of(box: FloatRect) -> float:
    return box["x"] + box["width"]


def overlap(one: FloatRect, other: FloatRect) -> bool:
    across = min(right_of(one), right_of(other)) - max(one["x"], other["x"])
    down = min(one["y"] + one["height"], other["y"] + other["height"]) - max(one["y"], other["y"])
    return across > PIXEL and down > PIXEL


def within_width(inner: FloatRect, outer: FloatRect) -> bool:
    return inner["x"] >= outer["x"] - PIXEL and right_of(inner) <= right_of(outer) + PIXEL


async def fields_of(page: Page, event_type: str) -> dict[str, str]:
    """The fields the timeline shows of the order's event of `event_type`."""
    event = page.locator(f'#timeline li[data-type="{event_type}"]')
    names = await event.locator("dt").all_text_contents()
    values = await event.locator("dd").all_text_contents()
    return dict(zip(names, values, strict=True))


# against the whole system
def sign_in_link(settings: Settings, subject: str, role: Role) -> str:
    """What `orderflow token --link` prints, run as a person would under `make run`."""
    result = CliRunner().invoke(
        cli,
        ["token", "--role", role.value, "--subject", subject, "--link", "--api-url", settings.api_url],
        env={
            "ORDERFLOW_AUTH_LOCAL_ISSUER": "true",
            "ORDERFLOW_AUTH_LOCAL_ISSUER_KEY_FILE": str(settings.auth_local_issuer_key_file),
        },
    )
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


async def place(settings: Settings, customer: str) -> str:
    """An order placed by `customer`, through the gateway; its id."""
    order_id = unique_id("browser")
    async with httpx.AsyncClient(
        base_url=settings.api_url, headers=bearer(settings, customer, Role.CUSTOMER)
    ) as client:
        placed = await client.post("/orders", json=order_body(order_id=order_id))
    assert placed.status_code == 202, placed.text
    return order_id


async def state_of(settings: Settings, order_id: str) -> str | None:
    """The order's state as an operator reads it (None: not known yet)."""
    async with httpx.AsyncClient(
        base_url=settings.api_url, headers=bearer(settings, "olga", Role.OPERATOR)
    ) as client:
        answer = await client.get(f"/orders/{order_id}")
    return str(answer.json()["state"]) if answer.status_code == 200 else None


async def awaiting_approval(settings: Settings, order_id: str) -> None:
    async def in_review() -> bool:
        return await state_of(settings, order_id) == OrderState.AWAITING_APPROVAL.value

    await eventually(in_review, LIFECYCLE_TIMEOUT_MS / 1000)


@pytest.mark.e2e
async def test_the_dashboard_signs_in_with_a_link_follows_an_order_live_and_approves_it(
    system: Settings, browser: Browser, tmp_path: Path
) -> None:
    page = await browser.new_page(viewport={"width": 1400, "height": 900})
    complaints: list[str] = []  # the page's own errors, and what its security policy blocked
    page.on("console", lambda message: complaints.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: complaints.append(str(error)))
    link = sign_in_link(system, "rita", Role.REVIEWER)
    await page.goto(link)
    await expect(page.locator("#live")).to_have_text("live")
    await expect(page.locator("#who")).to_have_text("rita · reviewer")
    assert page.url == f"{system.api_url}/dashboard"  # the token left the address bar at once
    assert await page.evaluate("sessionStorage.getItem('orderflow.token')") == link.partition("#token=")[2]
    await page.evaluate("window.loadedOnce = true")  # gone if the page were loaded again

    order_id = await place(system, "cleo")

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
    assert complaints == []

    await page.reload()  # the session outlives a reload (sessionStorage), not a sign-out
    await expect(page.locator("#who")).to_have_text("rita · reviewer")
    await page.click("#sign-out")
    await expect(page.locator("#sign-in")).to_be_visible()
    await expect(page.locator("#app")).to_be_hidden()
    assert await page.evaluate("sessionStorage.getItem('orderflow.token')") is None


@pytest.mark.e2e
async def test_a_customer_signs_in_with_a_pasted_token_and_sees_its_own_orders_without_approve(
    system: Settings, browser: Browser
) -> None:
    own, others = await place(system, "cleo"), await place(system, "carl")
    token = bearer(system, "cleo", Role.CUSTOMER)["Authorization"].removeprefix("Bearer ")
    page = await browser.new_page(viewport={"width": 1400, "height": 900})
    await page.goto(f"{system.api_url}/dashboard")
    await expect(page.locator("#sign-in")).to_be_visible()
    await page.fill("#token", token)
    await page.click("#sign-in-form button[type=submit]")

    await expect(page.locator("#who")).to_have_text("cleo · customer")
    row = page.locator(f'#orders tbody tr[data-order-id="{own}"]')
    await expect(row).to_be_visible(timeout=LIFECYCLE_TIMEOUT_MS)
    await expect(page.locator(f'#orders tbody tr[data-order-id="{others}"]')).to_have_count(0)
    await expect(page.locator("#figures")).to_be_hidden()  # the figures are for reviewers
    await row.click()
    await expect(page.locator("#detail-id")).to_have_text(own)
    await expect(page.locator("#approve")).to_be_hidden()
    await expect(page.locator("#workflow-link")).to_be_hidden()  # the Temporal UI is for the staff
    await expect(page.locator("#cancel")).to_be_enabled(timeout=LIFECYCLE_TIMEOUT_MS)

    cancels: list[str] = []
    page.on(
        "request", lambda request: cancels.append(request.url) if request.url.endswith("/cancel") else None
    )
    confirmation = page.locator("#cancel-dialog")
    await page.click("#cancel")  # kept, with the dialog's button
    await expect(confirmation).to_be_visible()
    await expect(page.locator("#cancel-order-id")).to_have_text(own)
    await page.click("#cancel-keep")
    await expect(confirmation).to_be_hidden()
    await page.click("#cancel")  # kept, with Escape
    await expect(confirmation).to_be_visible()
    await page.keyboard.press("Escape")
    await expect(confirmation).to_be_hidden()
    await page.click("#cancel")  # confirmed
    await page.fill("#cancel-reason", "ordered twice")
    await page.click("#cancel-confirm")
    await expect(page.locator("#action-result")).to_have_text("CancelOrder accepted")
    assert cancels == [f"{system.api_url}/orders/{own}/cancel"]  # the confirmed one alone
    await expect(page.locator("#detail-state")).to_have_text("cancelled", timeout=LIFECYCLE_TIMEOUT_MS)
    await expect(page.locator('#timeline li[data-type="cancelled"]')).to_have_count(1)
    assert (await fields_of(page, "cancelled"))["reason"] == "ordered twice"

    # a token the gateway does not take (another issuer's, say) sends it back to sign in
    await page.evaluate(
        "sessionStorage.setItem('orderflow.token', sessionStorage.getItem('orderflow.token') + 'x')"
    )
    await page.reload()
    await expect(page.locator("#sign-in-message")).to_contain_text("did not accept the token")
    await expect(page.locator("#app")).to_be_hidden()


@contextmanager
def cross_site_page(action: str) -> Iterator[str]:
    """Another site (`localhost`, another port) whose page posts a form to `action` as soon as
    it loads, as any page a reviewer visits could; yields its URL."""
    page = (
        f'<!doctype html><form method="post" action="{action}"><input type="hidden" name="note" value="x">'
        "</form><script>document.forms[0].submit()</script>"
    ).encode()
    with serving_page(page) as port:
        yield f"http://localhost:{port}/"


@pytest.mark.e2e
async def test_a_cross_site_form_post_approves_nothing(system: Settings, browser: Browser) -> None:
    """The reviewer is signed in to the dashboard and visits another site, whose form posts an
    approval to the gateway: the browser sends it, with nothing the gateway acts on."""
    order_id = await place(system, "cleo")
    await awaiting_approval(system, order_id)
    context = await browser.new_context()
    dashboard = await context.new_page()
    await dashboard.goto(sign_in_link(system, "rita", Role.REVIEWER))
    await expect(dashboard.locator("#live")).to_have_text("live")
    approve = f"{system.api_url}/orders/{order_id}/approve"

    with cross_site_page(approve) as attacker:
        visited = await context.new_page()
        async with visited.expect_response(approve) as posted:
            await visited.goto(attacker)
        response = await posted.value

    assert response.request.method == "POST"
    assert response.status == 401
    await asyncio.sleep(2)  # what an accepted approval would have needed to show
    assert await state_of(system, order_id) == OrderState.AWAITING_APPROVAL.value


async def show_only(page: Page, state: str) -> None:
    """Filter the list by a state, and wait until it shows that state only."""
    await page.click(f'#states .chip[data-state="{state}"]')
    await expect(page.locator(f'#states .chip[data-state="{state}"]')).to_have_attribute(
        "aria-pressed", "true"
    )
    await expect(page.locator("#orders tbody td.state").filter(has_not_text=state)).to_have_count(0)
