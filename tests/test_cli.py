"""The `orderflow` CLI against a real gateway process (`python -m services.api`) and real servers.

Commands run in-process with typer's CliRunner, in a thread so the test's event loop stays free;
they talk HTTP to the gateway, which runs as its own process on a free port, and send the token
each test gives them (never the developer's own login or ORDERFLOW_TOKEN).
"""

from __future__ import annotations

import asyncio
import json
import stat
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
import jwt
import pytest
import uvicorn
from aio_pika.abc import AbstractQueue
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route
from typer.testing import CliRunner, Result

from devstack.stack import service_environment
from services.cli.errors import WATCH_TIMEOUT_EXIT_CODE
from services.cli.main import app
from shared import local_issuer
from shared.contracts import (
    CommandType,
    EventType,
    OrderState,
    PlaceOrder,
    RecordedEvent,
    Role,
    command_adapter,
)
from shared.settings import Settings
from testsupport.amqp import next_message
from testsupport.gateway import bearer, closed_port
from testsupport.orders import ADDRESS, example_event, unique_id
from testsupport.polling import eventually
from testsupport.read_model import insert_events, insert_order

ADDRESS_OPTIONS = [
    "--name",
    ADDRESS["name"],
    "--line1",
    ADDRESS["line1"],
    "--city",
    ADDRESS["city"],
    "--postal-code",
    ADDRESS["postal_code"],
    "--country",
    ADDRESS["country"],
]
COMMANDS = [
    "place",
    "approve",
    "cancel",
    "update-address",
    "status",
    "list",
    "history",
    "watch",
    "migrate",
    "health",
    "token",
    "login",
    "logout",
]

runner = CliRunner()


async def orderflow(*args: str, env: dict[str, str] | None = None) -> Result:
    """Run the CLI in a thread: its commands block (HTTP) or run their own event loop (watch)."""
    result: Result = await asyncio.to_thread(runner.invoke, app, list(args), env=env)
    return result


@pytest.fixture(autouse=True)
def no_ambient_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A config directory of the test's own (so no developer's login is read or overwritten) and no
    ORDERFLOW_TOKEN; yields where `orderflow login` stores its token."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("ORDERFLOW_TOKEN", raising=False)
    return tmp_path / "config" / "orderflow" / "token"


def token_of(settings: Settings, subject: str, *roles: Role) -> str:
    return bearer(settings, subject, *roles)["Authorization"].removeprefix("Bearer ")


def stored_login(path: Path) -> tuple[str, int] | None:
    """The token `orderflow login` stored at `path`, and the file's permissions; None: none."""
    if not path.exists():
        return None
    return path.read_text().strip(), stat.S_IMODE(path.stat().st_mode)


def with_token(token: str) -> dict[str, str]:
    return {"ORDERFLOW_TOKEN": token}


@pytest.fixture(scope="module")
def as_operator(base_settings: Settings) -> dict[str, str]:
    """The environment of an operator's `orderflow` (who may do everything)."""
    return with_token(token_of(base_settings, "olga", Role.OPERATOR))


def accepted_command_id(result: Result) -> str:
    assert result.exit_code == 0, result.output
    command_id: str = json.loads(result.stdout)["command_id"]
    return command_id


# --- help and errors ------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [[], *([name] for name in COMMANDS)])
def test_every_command_has_help(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])

    assert result.exit_code == 0, result.output
    assert "Usage: orderflow" in result.stdout


def test_a_bad_item_is_a_usage_error() -> None:
    result = runner.invoke(app, ["place", "--payment-id", "p-1", "--item", "BOOK-1", *ADDRESS_OPTIONS])

    assert result.exit_code == 2
    assert "SKU:QTY[:PRICE_CENTS]" in result.output


@pytest.mark.parametrize(
    "command",
    [
        pytest.param("status", id="an_unreachable_gateway_is_a_clear_error"),
        pytest.param("watch", id="watch_reports_an_unreachable_gateway"),
    ],
)
async def test_an_unreachable_gateway_is_a_clear_error(command: str) -> None:
    result = await orderflow(command, "ord-1", "--api-url", f"http://127.0.0.1:{closed_port()}")

    assert result.exit_code == 1
    assert "cannot reach the gateway" in result.stderr
    assert "Traceback" not in result.output


GATEWAY_COMMANDS = [
    ["place", "--payment-id", "p-1", "--item", "BOOK-1:1", *ADDRESS_OPTIONS],
    ["approve", "ord-1"],
    ["cancel", "ord-1"],
    ["update-address", "ord-1", *ADDRESS_OPTIONS],
    ["status", "ord-1"],
    ["list"],
    ["history", "ord-1"],
    ["health"],
]
SETTINGS_COMMANDS = [
    *GATEWAY_COMMANDS,
    ["migrate"],
    ["dlq", "list"],
    ["dlq", "show", "m-1"],
    ["dlq", "replay", "m-1"],
]


@pytest.mark.parametrize("command", SETTINGS_COMMANDS, ids=lambda command: " ".join(command[:2]))
async def test_a_bad_setting_is_one_line_that_names_it(command: list[str]) -> None:
    result = await orderflow(*command, env={"ORDERFLOW_API_PORT": "abc"})

    assert result.exit_code == 2
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("Error: invalid settings: ORDERFLOW_API_PORT: Input should be a valid integer")


@pytest.mark.parametrize("command", GATEWAY_COMMANDS, ids=lambda command: command[0])
async def test_an_unreachable_gateway_is_one_line_for_every_command(command: list[str]) -> None:
    result = await orderflow(*command, "--api-url", f"http://127.0.0.1:{closed_port()}")

    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("Error: cannot reach the gateway at http://127.0.0.1:")


async def test_an_unreachable_broker_is_one_line_at_once() -> None:
    port = closed_port()
    amqp_url = f"amqp://guest:guest@127.0.0.1:{port}/"

    started = time.monotonic()
    result = await orderflow("dlq", "list", env={"ORDERFLOW_AMQP_URL": amqp_url})

    assert time.monotonic() - started < 10  # not the patience of a service that waits for it
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert line == (
        f"Error: cannot reach RabbitMQ at amqp://guest@127.0.0.1:{port}/ (connection refused); "
        "is it running? set ORDERFLOW_AMQP_URL"
    )


def test_version_is_the_packages_whatever_the_settings() -> None:
    result = runner.invoke(app, ["--version"], env={"ORDERFLOW_API_PORT": "abc"})

    assert result.exit_code == 0, result.output
    assert result.stdout == f"orderflow {version('orderflow')}\n"


@asynccontextmanager
async def stand_in(*routes: Route) -> AsyncIterator[str]:
    """A stand-in gateway on a free port serving only these routes; yields its URL."""
    port = closed_port()
    server = uvicorn.Server(uvicorn.Config(Starlette(routes=list(routes)), port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())

    async def started() -> bool:
        return server.started

    try:
        await eventually(started)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await serving


# --- health ---------------------------------------------------------------------------------------
def stand_in_gateway(liveness: Response, readiness: Response) -> AbstractAsyncContextManager[str]:
    """A stand-in answering /healthz and /readyz as told."""

    async def healthz(_: Request) -> Response:
        return liveness

    async def readyz(_: Request) -> Response:
        return readiness

    return stand_in(Route("/healthz", healthz), Route("/readyz", readyz))


async def test_health_of_a_ready_gateway(gateway_url: str) -> None:
    text = await orderflow("health", "--api-url", gateway_url)
    as_json = await orderflow("health", "--api-url", gateway_url, "--json")

    assert text.exit_code == 0, text.output
    header, *rows, verdict = text.stdout.splitlines()
    assert header.split() == ["DEPENDENCY", "STATE", "DETAIL"]
    assert {row.split()[0]: row.split()[1] for row in rows} == {
        "gateway": "live",
        "broker": "ok",
        "database": "ok",
        "temporal": "ok",
    }
    assert verdict == "ready"
    health = json.loads(as_json.stdout)
    assert (health["gateway"], health["live"], health["ready"], health["failed"]) == (
        gateway_url,
        True,
        True,
        [],
    )
    assert set(health["checks"]) == {"broker", "database", "temporal"}


async def test_health_of_a_gateway_that_is_not_ready_fails_and_names_the_dependency() -> None:
    readiness = {
        "ready": False,
        "checks": {
            "broker": {"ok": True, "detail": "channel open"},
            "temporal": {"ok": False, "detail": "the workflow service is not serving"},
        },
        "failed": ["temporal"],
    }
    async with stand_in_gateway(JSONResponse({"status": "ok"}), JSONResponse(readiness, 503)) as url:
        text = await orderflow("health", "--api-url", url)
        as_json = await orderflow("health", "--api-url", url, "--json")

    assert text.exit_code == 1
    *_, temporal, verdict = text.stdout.splitlines()
    assert temporal.split(maxsplit=2) == ["temporal", "FAILED", "the workflow service is not serving"]
    assert verdict == "not ready: temporal"
    assert as_json.exit_code == 1
    assert json.loads(as_json.stdout)["failed"] == ["temporal"]


@pytest.mark.parametrize(
    ("liveness", "readiness", "said"),
    [
        (PlainTextResponse("down", 500), JSONResponse({}), "is not live: /healthz answered 500"),
        (JSONResponse({"status": "ok"}), PlainTextResponse("hello"), "is not an orderflow gateway"),
        (JSONResponse({"status": "ok"}), PlainTextResponse("gone", 404), "answered /readyz with 404"),
    ],
)
async def test_health_of_something_else_than_a_gateway_is_one_line(
    liveness: Response, readiness: Response, said: str
) -> None:
    async with stand_in_gateway(liveness, readiness) as url:
        result = await orderflow("health", "--api-url", url)

    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert said in line


# --- identity: tokens, login, and what the gateway is sent ------------------------------------------
def cli_environment(settings: Settings, **changes: str) -> dict[str, str]:
    """The ORDERFLOW_* settings of `settings` (the gateway's own), with `changes`."""
    env = {
        name: value for name, value in service_environment(settings).items() if name.startswith("ORDERFLOW_")
    }
    return env | {f"ORDERFLOW_{name.upper()}": value for name, value in changes.items()}


async def rita_s_token(settings: Settings, *options: str, **changes: str) -> Result:
    """`orderflow token` for the reviewer rita, with more `options`, under `settings` with `changes`."""
    return await orderflow(
        "token", "--role", "reviewer", "--subject", "rita", *options, env=cli_environment(settings, **changes)
    )


def verified_claims(settings: Settings, token: str) -> dict[str, Any]:
    """The claims of a token signed by the tests' local issuer (an error if it was not)."""
    public_key = local_issuer.load_private_key(settings.auth_local_issuer_key_file).public_key()
    claims: dict[str, Any] = jwt.decode(
        token, public_key, algorithms=[local_issuer.ALGORITHM], audience=settings.auth_audience
    )
    return claims


async def test_token_prints_a_token_the_gateway_accepts(gateway_url: str, base_settings: Settings) -> None:
    minted = await rita_s_token(base_settings, "--lifetime", "600")

    assert minted.exit_code == 0, minted.output
    token = minted.stdout.strip()
    claims = verified_claims(base_settings, token)
    assert (claims["iss"], claims["sub"], claims["roles"]) == (local_issuer.ISSUER, "rita", ["reviewer"])
    assert claims["exp"] - claims["iat"] == 600
    async with httpx.AsyncClient(base_url=gateway_url) as client:
        accepted = await client.get("/orders", headers={"Authorization": f"Bearer {token}"})
        anonymous = await client.get("/orders")
    assert accepted.status_code == 200, accepted.text
    assert anonymous.status_code == 401


async def test_token_under_make_run_needs_no_setting(base_settings: Settings) -> None:
    """`make run` turns the local issuer on where ORDERFLOW_AUTH_LOCAL_ISSUER is not set, and so
    does `orderflow token`, so that it works in another shell as the banner says."""
    env = cli_environment(base_settings)
    del env["ORDERFLOW_AUTH_LOCAL_ISSUER"]

    minted = await orderflow(
        "token", "--role", "customer", "--role", "operator", "--subject", "cleo", env=env
    )

    assert minted.exit_code == 0, minted.output
    claims = verified_claims(base_settings, minted.stdout.strip())
    assert claims["roles"] == ["customer", "operator"]
    assert claims["exp"] - claims["iat"] == base_settings.auth_local_token_lifetime_seconds


@pytest.mark.parametrize(
    ("changes", "said"),
    [
        ({"auth_local_issuer": "false"}, "no local issuer is configured (ORDERFLOW_AUTH_LOCAL_ISSUER=false)"),
        ({"auth_local_issuer_key_file": "/nonexistent/issuer.pem"}, "/nonexistent/issuer.pem does not exist"),
    ],
    ids=["switched off", "no key"],
)
async def test_token_without_a_local_issuer_is_one_line(
    base_settings: Settings, changes: dict[str, str], said: str
) -> None:
    result = await rita_s_token(base_settings, **changes)

    assert result.exit_code == 1
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("Error: no local issuer") and said in line


async def test_token_link_signs_in_to_the_dashboard_with_the_token_in_the_fragment(
    base_settings: Settings,
) -> None:
    result = await rita_s_token(base_settings, "--link", "--api-url", "https://orders.example/")

    assert result.exit_code == 0, result.output
    link = result.stdout.strip()
    page, _, fragment = link.partition("#")
    assert page == "https://orders.example/dashboard"
    assert fragment.startswith("token=")
    assert verified_claims(base_settings, fragment.removeprefix("token="))["sub"] == "rita"


@asynccontextmanager
async def listening_gateway(status_code: int = 200) -> AsyncIterator[tuple[str, list[str | None]]]:
    """A stand-in gateway answering `GET /orders` with `status_code`; yields its URL and the
    Authorization header of each request, in order."""
    seen: list[str | None] = []

    async def orders(request: Request) -> Response:
        seen.append(request.headers.get("authorization"))
        return JSONResponse(
            {"items": [], "next_cursor": None} if status_code == 200 else {"detail": "no"}, status_code
        )

    async with stand_in(Route("/orders", orders)) as url:
        yield url, seen


async def test_the_token_sent_is_the_option_else_the_environment_else_the_login(
    base_settings: Settings, no_ambient_token: Path
) -> None:
    stored, from_env, from_option = (
        token_of(base_settings, name, Role.CUSTOMER) for name in ("st", "en", "op")
    )
    login = await asyncio.to_thread(runner.invoke, app, ["login"], input=stored + "\n")  # from stdin

    async with listening_gateway() as (url, seen):
        for env, option in [
            ({}, []),
            (with_token(from_env), []),
            (with_token(from_env), ["--token", from_option]),
        ]:
            result = await orderflow("list", "--api-url", url, *option, env=env)
            assert result.exit_code == 0, result.output

    assert login.exit_code == 0, login.output
    assert login.stdout.startswith("signed in as st (customer, until ")
    assert stored not in login.output  # a token is not echoed
    assert seen == [f"Bearer {stored}", f"Bearer {from_env}", f"Bearer {from_option}"]
    assert stored_login(no_ambient_token) == (stored, 0o600)


async def test_logout_forgets_the_stored_token(base_settings: Settings, no_ambient_token: Path) -> None:
    login = await orderflow("login", "--token", token_of(base_settings, "st", Role.CUSTOMER))
    logout = await orderflow("logout")
    again = await orderflow("logout")

    async with listening_gateway(401) as (url, seen):
        result = await orderflow("list", "--api-url", url)

    assert (login.exit_code, logout.exit_code, again.exit_code) == (0, 0, 0)
    assert (logout.stdout, again.stdout) == ("signed out\n", "no stored token; nothing to do\n")
    assert stored_login(no_ambient_token) is None
    assert seen == [None]
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("Error: the gateway answered 401 Unauthorized: no (no token was sent: ")


@pytest.mark.parametrize(
    ("token", "said"),
    [("not-a-token", "this is not a JWT access token"), ("expired", "this token expired at ")],
)
async def test_login_refuses_what_is_not_a_usable_token(
    base_settings: Settings, no_ambient_token: Path, token: str, said: str
) -> None:
    if token == "expired":
        token = local_issuer.mint_token(
            base_settings, "old", [Role.CUSTOMER], lifetime_seconds=60, now=time.time() - 3600
        )

    result = await orderflow("login", "--token", token)

    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert said in line
    assert stored_login(no_ambient_token) is None


async def test_a_refusal_of_the_gateway_is_its_reason_on_one_line(
    gateway_url: str, base_settings: Settings
) -> None:
    anonymous = await orderflow("approve", unique_id("cli"), "--api-url", gateway_url)
    customer = await orderflow(
        "approve",
        unique_id("cli"),
        "--api-url",
        gateway_url,
        env=with_token(token_of(base_settings, "cleo", Role.CUSTOMER)),
    )

    assert anonymous.exit_code == 1
    (line,) = anonymous.stderr.splitlines()
    assert line.startswith("Error: the gateway answered 401 Unauthorized: ") and "no token was sent" in line
    assert customer.exit_code == 1
    (line,) = customer.stderr.splitlines()
    assert line.startswith("Error: the gateway answered 403 Forbidden: ")


# --- commands -------------------------------------------------------------------------------------
async def test_place_publishes_the_order(
    gateway_url: str, as_operator: dict[str, str], command_queue: AbstractQueue
) -> None:
    order_id = unique_id("cli")

    result = await orderflow(
        "place",
        "--api-url",
        gateway_url,
        "--order-id",
        order_id,
        "--payment-id",
        "pay-cli-1",
        "--item",
        "BOOK-1:2:1250",
        "--item",
        "PEN-7:1",
        *ADDRESS_OPTIONS,
        "--region",
        "Westminster",
        "--json",
        env=as_operator,
    )

    command_id = accepted_command_id(result)
    message = await next_message(command_queue, lambda m: m.message_id == command_id)
    command = PlaceOrder.model_validate_json(message.body)
    assert command.order_id == order_id
    assert command.payload.model_dump(mode="json")["items"] == [
        {"sku": "BOOK-1", "qty": 2, "unit_price_cents": 1250},
        {"sku": "PEN-7", "qty": 1, "unit_price_cents": 0},
    ]
    assert command.payload.address.region == "Westminster"


async def test_place_shows_the_gateways_validation_errors(
    gateway_url: str, as_operator: dict[str, str]
) -> None:
    result = await orderflow(
        "place",
        "--api-url",
        gateway_url,
        "--payment-id",
        "pay 1",
        "--item",
        "BOOK-1:0",
        *ADDRESS_OPTIONS[:-1],
        "germany",
        env=as_operator,
    )

    assert result.exit_code == 1
    assert "422" in result.stderr
    for field in ("payment_id", "items.0.qty", "address.country"):
        assert field in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("arguments", "command_type", "payload"),
    [
        (["approve", "--note", "looks fine"], CommandType.APPROVE, {"note": "looks fine"}),
        (["cancel", "--reason", "duplicate"], CommandType.CANCEL, {"reason": "duplicate"}),
        (["update-address", *ADDRESS_OPTIONS[:-1], "IE"], CommandType.UPDATE_ADDRESS, None),
    ],
)
async def test_order_commands_publish_their_type(
    gateway_url: str,
    as_operator: dict[str, str],
    command_queue: AbstractQueue,
    arguments: list[str],
    command_type: CommandType,
    payload: dict[str, Any] | None,
) -> None:
    order_id = unique_id("cli")
    verb, *options = arguments

    result = await orderflow(verb, order_id, *options, "--api-url", gateway_url, "--json", env=as_operator)

    command_id = accepted_command_id(result)
    message = await next_message(command_queue, lambda m: m.message_id == command_id)
    command = command_adapter.validate_json(message.body)
    assert (command.type, command.order_id) == (command_type, order_id)
    assert command.issued_by is not None and command.issued_by.subject == "olga"  # the token's
    if payload is not None:
        assert command.payload.model_dump(mode="json") == payload
    else:
        assert command.payload.model_dump(mode="json")["address"]["country"] == "IE"


async def test_commands_print_text_by_default(
    gateway_url: str, as_operator: dict[str, str], command_queue: AbstractQueue
) -> None:
    command_id = str(uuid4())

    result = await orderflow(
        "approve", "cli-text-1", "--command-id", command_id, "--api-url", gateway_url, env=as_operator
    )

    assert result.exit_code == 0, result.output
    assert f"accepted: ApproveOrder for order cli-text-1 (command {command_id})" in result.stdout
    await next_message(command_queue, lambda m: m.message_id == command_id)


# --- queries --------------------------------------------------------------------------------------
async def test_status_from_the_orders_table(
    gateway_url: str, as_operator: dict[str, str], db_sessions: async_sessionmaker[AsyncSession]
) -> None:
    order_id = unique_id("cli")
    await insert_order(db_sessions, order_id, OrderState.PAID)

    text = await orderflow("status", order_id, "--api-url", gateway_url, env=as_operator)
    as_json = await orderflow("status", order_id, "--api-url", gateway_url, "--json", env=as_operator)

    assert text.exit_code == 0, text.output
    assert f"order {order_id}: paid (from the orders table)" in text.stdout
    assert "Ada Lovelace, 12 St James's Square, London, SW1Y 4JH, GB" in text.stdout
    assert json.loads(as_json.stdout)["source"] == "read_model"


async def test_status_of_an_unknown_order_fails(gateway_url: str, as_operator: dict[str, str]) -> None:
    result = await orderflow("status", "cli-never-placed", "--api-url", gateway_url, env=as_operator)

    assert result.exit_code == 1
    assert "404" in result.stderr and "cli-never-placed" in result.stderr


async def test_list_pages_through_orders(
    gateway_url: str, as_operator: dict[str, str], db_sessions: async_sessionmaker[AsyncSession]
) -> None:
    # far in the future, so these are the newest orders whatever else the table holds
    start = datetime(3000, 1, 1, tzinfo=UTC)
    oldest, older, newer = (unique_id("cli") for _ in range(3))
    for minute, order_id in enumerate([oldest, older, newer]):
        await insert_order(db_sessions, order_id, OrderState.VALIDATED, start + timedelta(minutes=minute))

    first = await orderflow(
        "list", "--state", "validated", "--limit", "1", "--api-url", gateway_url, "--json", env=as_operator
    )
    cursor = json.loads(first.stdout)["next_cursor"]
    second = await orderflow(
        "list",
        "--state",
        "validated",
        "--limit",
        "1",
        "--cursor",
        cursor,
        "--api-url",
        gateway_url,
        env=as_operator,
    )

    assert [order["order_id"] for order in json.loads(first.stdout)["items"]] == [newer]
    assert second.exit_code == 0, second.output
    header, row, more = second.stdout.splitlines()
    assert header.split() == ["ORDER", "STATE", "AMOUNT", "CREATED"]
    assert row.split()[:3] == [older, "validated", "25.00"]
    assert more.startswith("more: orderflow list --cursor ")


async def test_history_prints_events_in_order(
    gateway_url: str, as_operator: dict[str, str], db_sessions: async_sessionmaker[AsyncSession]
) -> None:
    order_id = unique_id("cli")
    await insert_events(db_sessions, order_id, {2: EventType.VALIDATED, 1: EventType.RECEIVED})

    result = await orderflow("history", order_id, "--api-url", gateway_url, env=as_operator)

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [(line.split()[1], line.split()[3]) for line in lines] == [("#1", "received"), ("#2", "validated")]


# --- watch ----------------------------------------------------------------------------------------
def printed_events(result: Result) -> list[tuple[int, EventType]]:
    """What `watch --json` printed: contract events (the streams' positions left out), one a line."""
    events = [RecordedEvent.model_validate_json(line) for line in result.stdout.splitlines()]
    return [(event.seq, event.type) for event in events]


@pytest.mark.parametrize(
    ("ending", "exit_code"),
    [(EventType.COMPLETED, 0), (EventType.CANCELLED, 3), (EventType.FAILED, 4), (EventType.TERMINATED, 5)],
)
async def test_watch_prints_the_events_until_the_order_ends_and_exits_with_its_ending(
    gateway_url: str,
    as_operator: dict[str, str],
    db_sessions: async_sessionmaker[AsyncSession],
    ending: EventType,
    exit_code: int,
) -> None:
    order_id = unique_id("watch")
    await insert_events(db_sessions, order_id, {1: EventType.RECEIVED})
    watching = asyncio.create_task(
        orderflow("watch", order_id, "--timeout", "20", "--json", "--api-url", gateway_url, env=as_operator)
    )
    await asyncio.sleep(0.5)  # most likely the watch is following by now; if not, these are history
    await insert_events(db_sessions, order_id, {2: EventType.VALIDATED})
    await insert_events(db_sessions, order_id, {3: ending})

    result = await asyncio.wait_for(watching, 30)

    assert result.exit_code == exit_code, result.output
    assert printed_events(result) == [(1, EventType.RECEIVED), (2, EventType.VALIDATED), (3, ending)]
    assert f"watching order {order_id}" in result.stderr
    assert f"order {order_id} {ending.value}" in result.stderr


async def test_watch_of_an_ended_order_prints_its_history_and_ends_at_once(
    gateway_url: str, as_operator: dict[str, str], db_sessions: async_sessionmaker[AsyncSession]
) -> None:
    order_id = unique_id("watch")
    await insert_events(
        db_sessions, order_id, {1: EventType.RECEIVED, 2: EventType.VALIDATED, 3: EventType.FAILED}
    )

    result = await orderflow(
        "watch", order_id, "--timeout", "20", "--json", "--api-url", gateway_url, env=as_operator
    )

    assert result.exit_code == 4, result.output
    assert printed_events(result) == [
        (1, EventType.RECEIVED),
        (2, EventType.VALIDATED),
        (3, EventType.FAILED),
    ]


async def test_watch_waits_for_an_order_that_is_not_known_yet(
    gateway_url: str, as_operator: dict[str, str], db_sessions: async_sessionmaker[AsyncSession]
) -> None:
    order_id = unique_id("watch")  # placed a moment ago, say: nothing stored yet
    watching = asyncio.create_task(
        orderflow("watch", order_id, "--timeout", "20", "--api-url", gateway_url, env=as_operator)
    )
    await asyncio.sleep(1)
    await insert_events(db_sessions, order_id, {1: EventType.RECEIVED, 2: EventType.COMPLETED})

    result = await asyncio.wait_for(watching, 30)

    assert result.exit_code == 0, result.output
    assert f"order {order_id} is not known yet" in result.stderr
    # the gateway's 404 is the waiting message, not an error (the random id may contain "404")
    assert "404" not in result.output.replace(order_id, "")
    assert [line.split()[3] for line in result.stdout.splitlines()] == ["received", "completed"]


async def test_watch_gives_up_after_its_timeout(
    gateway_url: str, as_operator: dict[str, str], db_sessions: async_sessionmaker[AsyncSession]
) -> None:
    order_id = unique_id("watch")
    await insert_events(db_sessions, order_id, {1: EventType.RECEIVED})

    result = await orderflow("watch", order_id, "--timeout", "1", "--api-url", gateway_url, env=as_operator)

    assert result.exit_code == WATCH_TIMEOUT_EXIT_CODE
    assert "did not end within 1 s" in result.stderr
    assert "received" in result.stdout


async def test_watch_resumes_a_lost_stream_after_the_last_event_it_saw() -> None:
    """A stand-in gateway whose first stream breaks off after one event, as a restarting gateway's
    does; the watch asks again with Last-Event-ID and gets the rest."""
    order_id = unique_id("watch")
    asked_after: list[str | None] = []

    async def stream(request: Request) -> StreamingResponse:
        last_event_id = request.headers.get("last-event-id")
        asked_after.append(last_event_id)
        seq = 1 if last_event_id is None else 2
        ending = EventType.RECEIVED if seq == 1 else EventType.COMPLETED
        event = example_event(order_id, seq, ending)
        body = f"id: 0\n\ndata: {event.model_dump_json()}\nid: {seq * 10}\n\n"
        return StreamingResponse(iter([body]), media_type="text/event-stream")

    async with stand_in(Route(f"/orders/{order_id}/events/stream", stream)) as url:
        result = await orderflow("watch", order_id, "--timeout", "20", "--api-url", url)

    assert result.exit_code == 0, result.output
    assert asked_after == [None, "10"]
    assert [line.split()[3] for line in result.stdout.splitlines()] == ["received", "completed"]
    assert "resuming" in result.stderr


def test_watch_help_lists_its_exit_codes() -> None:
    result = runner.invoke(app, ["watch", "--help"])

    text = " ".join(result.stdout.split())
    assert "Exit codes: 0 completed, 3 cancelled, 4 failed, 5 terminated; 124 if it has not ended" in text


# --- migrate --------------------------------------------------------------------------------------
async def test_migrate_brings_the_database_up_to_date(
    base_settings: Settings, db_sessions: async_sessionmaker[AsyncSession]
) -> None:
    result = await orderflow("migrate", env={"ORDERFLOW_DATABASE_URL": base_settings.database_url})

    assert result.exit_code == 0, result.output
    assert "is at the newest migration" in result.stdout


async def test_migrate_reports_an_unreachable_database() -> None:
    address = f"postgresql+asyncpg://postgres@127.0.0.1:{closed_port()}/orderflow"
    database_url = address.replace("postgres@", "postgres:secret@")

    result = await orderflow("migrate", env={"ORDERFLOW_DATABASE_URL": database_url})

    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert line == (
        f"Error: cannot reach PostgreSQL at {address} (connection refused); "
        "is it running? set ORDERFLOW_DATABASE_URL"
    )


async def test_broker_provision_reports_an_unreachable_broker_in_one_line() -> None:
    port = closed_port()

    result = await orderflow(
        "broker", "provision", env={"ORDERFLOW_AMQP_URL": f"amqp://admin:secret@127.0.0.1:{port}/"}
    )

    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert line == (
        f"Error: cannot reach RabbitMQ at amqp://admin@127.0.0.1:{port}/ (connection refused); "
        "is it running? set ORDERFLOW_AMQP_URL"
    )
