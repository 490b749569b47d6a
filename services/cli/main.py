"""The `orderflow` command line: steer and follow orders through the REST gateway, get a token for
it, migrate the database, and provision the broker and work on its dead-letter queue."""

import asyncio
import json
import logging
import sys
from collections.abc import Callable, Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from aio_pika.exceptions import AMQPConnectionError, AMQPError
from pydantic import ValidationError
from sqlalchemy.engine import make_url

from services.cli import credentials, dlq, render
from services.cli.errors import BAD_SETTING_EXIT_CODE, WATCH_TIMEOUT_EXIT_CODE, fail, reason, unreachable
from services.cli.gateway import Gateway, order_path
from services.cli.watch import ENDING_EXIT_CODES, follow_order, note
from shared import broker_users, connection_security, local_issuer, schema
from shared.broker import DEAD_LETTER_QUEUE
from shared.contracts import OrderState, Role
from shared.settings import ENV_PREFIX, Settings, invalid_settings_message

T = TypeVar("T")

app = typer.Typer(
    name="orderflow",
    help="Operate orderflow: place and steer orders, follow them, and migrate the database.",
    epilog="Exit codes: 0 done; 1 failed (refused, or a service cannot be reached); "
    f"{BAD_SETTING_EXIT_CODE} a bad option or ORDERFLOW_* setting; `watch` and `health` say more.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals would print settings, passwords included
)


def print_version(requested: bool) -> None:
    if requested:
        typer.echo(f"orderflow {version('orderflow')}")
        raise typer.Exit()


@app.callback()
def orderflow(
    show_version: Annotated[
        bool,
        typer.Option("--version", is_eager=True, callback=print_version, help="Print the version and exit."),
    ] = False,
) -> None:
    # a failure is reported once, by the command: not again by logging's last-resort handler
    if not logging.getLogger().handlers:
        logging.getLogger().addHandler(logging.NullHandler())


ApiUrl = Annotated[
    str | None,
    typer.Option(
        "--api-url", help="The REST gateway's base URL; by default settings.api_url (env ORDERFLOW_API_URL)."
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON for machines instead of text.")]
Token = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="ORDERFLOW_TOKEN",
        help="The bearer token to send; by default the one `orderflow login` stored.",
    ),
]
OrderId = Annotated[str, typer.Argument(help="The order id.")]
CommandId = Annotated[
    str | None,
    typer.Option("--command-id", help="A UUID to reuse when retrying, so the command applies once."),
]
Name = Annotated[str, typer.Option("--name", help="Recipient's name.")]
Line1 = Annotated[str, typer.Option("--line1", help="Street address.")]
Line2 = Annotated[str | None, typer.Option("--line2", help="Second address line.")]
City = Annotated[str, typer.Option("--city", help="City.")]
Region = Annotated[str | None, typer.Option("--region", help="Region, state or province.")]
PostalCode = Annotated[str, typer.Option("--postal-code", help="Postal code.")]
Country = Annotated[str, typer.Option("--country", help="ISO 3166-1 alpha-2 code, e.g. DE.")]


def settings() -> Settings:
    """Read per invocation; a bad setting ends the command with one line naming it."""
    try:
        return Settings()
    except ValidationError as error:
        fail(invalid_settings_message(error), BAD_SETTING_EXIT_CODE)


def gateway(api_url: str | None, token: str | None) -> Gateway:
    return Gateway(api_url or settings().api_url, credentials.chosen(token))


def show(
    value: T, as_json: bool, as_text: Callable[[T], str], as_data: Callable[[T], object] = lambda value: value
) -> None:
    typer.echo(json.dumps(as_data(value), indent=2, default=str) if as_json else as_text(value))


def send_command(gateway: Gateway, path: str, body: Mapping[str, object], as_json: bool) -> None:
    show(gateway.answer("POST", path, body=body), as_json, render.accepted)


ADDRESS_FIELDS = ("name", "line1", "line2", "city", "region", "postal_code", "country")


def address(*values: str | None) -> dict[str, str | None]:
    """The address fields, given in ADDRESS_FIELDS' order."""
    return dict(zip(ADDRESS_FIELDS, values, strict=True))


def parse_item(text: str) -> dict[str, str | int]:
    """`SKU:QTY[:PRICE_CENTS]` -> an order item (the gateway checks the bounds)."""
    sku, *numbers = text.split(":")
    try:
        values = [int(number) for number in numbers]
    except ValueError:
        values = []
    if len(values) not in (1, 2):
        raise typer.BadParameter(f"{text!r} is not SKU:QTY[:PRICE_CENTS]", param_hint="--item")
    return dict(zip(("sku", "qty", "unit_price_cents"), (sku, *values), strict=False))


@app.command()
def place(
    payment_id: Annotated[str, typer.Option("--payment-id", help="The payment's id.")],
    items: Annotated[list[str], typer.Option("--item", help="SKU:QTY[:PRICE_CENTS]; repeat for each item.")],
    name: Name,
    line1: Line1,
    city: City,
    postal_code: PostalCode,
    country: Country,
    line2: Line2 = None,
    region: Region = None,
    order_id: Annotated[
        str | None, typer.Option("--order-id", help="Generated by the gateway when absent.")
    ] = None,
    correlation_id: Annotated[
        str | None, typer.Option("--correlation-id", help="Copied onto its events.")
    ] = None,
    command_id: CommandId = None,
    api_url: ApiUrl = None,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Place an order."""
    body = {
        "order_id": order_id,
        "payment_id": payment_id,
        "items": [parse_item(item) for item in items],
        "address": address(name, line1, line2, city, region, postal_code, country),
        "correlation_id": correlation_id,
        "command_id": command_id,
    }
    send_command(gateway(api_url, token), "/orders", body, as_json)


def add_steering_command(action: str, field: str, field_help: str, summary: str) -> None:
    """`orderflow ACTION ORDER_ID [--FIELD TEXT]`, which sends the order's ACTION command."""

    def steer(
        order_id: OrderId,
        text: Annotated[str | None, typer.Option(f"--{field}", help=field_help)] = None,
        command_id: CommandId = None,
        api_url: ApiUrl = None,
        token: Token = None,
        as_json: AsJson = False,
    ) -> None:
        body = {field: text, "command_id": command_id}
        send_command(gateway(api_url, token), order_path(order_id, action), body, as_json)

    app.command(action, help=summary)(steer)


add_steering_command(
    "approve",
    "note",
    "Why.",
    "Approve an order waiting in manual review, as the token's subject (never one's own order).",
)
add_steering_command(
    "cancel", "reason", "Why it is cancelled.", "Cancel an order (until dispatch; a paid order is refunded)."
)


@app.command("update-address")
def update_address(
    order_id: OrderId,
    name: Name,
    line1: Line1,
    city: City,
    postal_code: PostalCode,
    country: Country,
    line2: Line2 = None,
    region: Region = None,
    command_id: CommandId = None,
    api_url: ApiUrl = None,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Change an order's shipping address (until dispatch)."""
    body = {
        "address": address(name, line1, line2, city, region, postal_code, country),
        "command_id": command_id,
    }
    send_command(gateway(api_url, token), order_path(order_id, "address"), body, as_json)


@app.command()
def status(order_id: OrderId, api_url: ApiUrl = None, token: Token = None, as_json: AsJson = False) -> None:
    """Show an order's live status (from its workflow, else from the orders table)."""
    show(gateway(api_url, token).answer("GET", order_path(order_id)), as_json, render.order_status)


@app.command("list")
def list_orders(
    state: Annotated[OrderState | None, typer.Option("--state", help="Only orders in this state.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=200, help="Orders per page.")] = 50,
    cursor: Annotated[str | None, typer.Option("--cursor", help="Where the previous page ended.")] = None,
    api_url: ApiUrl = None,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """List orders, newest first (a customer's own only)."""
    params = {"state": state.value if state else None, "limit": limit, "cursor": cursor}
    show(gateway(api_url, token).answer("GET", "/orders", params), as_json, render.order_page)


@app.command()
def history(order_id: OrderId, api_url: ApiUrl = None, token: Token = None, as_json: AsJson = False) -> None:
    """Show an order's events from the audit table, in order."""
    show(gateway(api_url, token).answer("GET", order_path(order_id, "events")), as_json, render.history)


WATCH_EXIT_CODES = ", ".join(f"{code} {ending.value}" for ending, code in ENDING_EXIT_CODES.items())


@app.command(
    epilog=f"Exit codes: {WATCH_EXIT_CODES}; {WATCH_TIMEOUT_EXIT_CODE} if it has not ended within "
    "--timeout; 1 if the gateway cannot be reached or refuses."
)
def watch(
    order_id: OrderId,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="Give up after this many seconds (exit code 124).")
    ] = 60.0,
    as_json: AsJson = False,
    api_url: ApiUrl = None,
    token: Token = None,
) -> None:
    """Print an order's events so far, then each as it happens, until it ends; the exit code says how."""
    note(f"watching order {order_id} for up to {timeout:g} s ...")
    try:
        ending = asyncio.run(
            asyncio.wait_for(follow_order(gateway(api_url, token), order_id, as_json), timeout)
        )
    except TimeoutError:
        fail(f"order {order_id} did not end within {timeout:g} s", WATCH_TIMEOUT_EXIT_CODE)
    note(f"order {order_id} {ending.type.value}")
    raise typer.Exit(ENDING_EXIT_CODES[ending.type])


@app.command(epilog="Exit codes: 0 ready; 1 not ready, or the gateway cannot be reached.")
def health(api_url: ApiUrl = None, as_json: AsJson = False) -> None:
    """Ask the gateway whether it is live and ready: /healthz, then /readyz (broker, database, Temporal)."""
    found = Gateway(api_url or settings().api_url, token=None).health()
    show(found, as_json, render.health)
    if not found["ready"]:
        raise typer.Exit(1)


@app.command("token", epilog="Exit codes: 0 printed; 1 no local issuer is configured, or its key is missing.")
def token_command(
    roles: Annotated[
        list[Role], typer.Option("--role", help="A role the token carries; repeat for several.")
    ],
    subject: Annotated[str, typer.Option("--subject", help="Who the token says its bearer is.")],
    lifetime: Annotated[
        int | None,
        typer.Option(
            "--lifetime",
            min=60,
            help="Seconds until it expires; by default settings.auth_local_token_lifetime_seconds.",
        ),
    ] = None,
    link: Annotated[
        bool, typer.Option("--link", help="Print a dashboard sign-in link (the token in its fragment).")
    ] = False,
    api_url: ApiUrl = None,
) -> None:
    """Print a bearer token from the local development issuer that `make run` sets up.

    A gateway trusts it only when ORDERFLOW_AUTH_LOCAL_ISSUER=true (as under `make run`).
    """
    current = settings()
    if not local_issuer.under_make_run(current):
        fail(
            "no local issuer is configured (ORDERFLOW_AUTH_LOCAL_ISSUER=false): get a token from your issuer"
        )
    try:
        minted = local_issuer.mint_token(current, subject, roles, lifetime_seconds=lifetime)
    except local_issuer.NoLocalIssuer as error:
        fail(f"no local issuer: {error}")
    # a URL fragment is never sent to a server, so the token stays out of its logs
    typer.echo(f"{(api_url or current.api_url).rstrip('/')}/dashboard#token={minted}" if link else minted)


@app.command(epilog="Exit codes: 0 stored; 1 not a token, or an expired one.")
def login(
    token: Annotated[
        str | None, typer.Option("--token", help="The token; by default read from stdin.")
    ] = None,
) -> None:
    """Store a bearer token for the commands that follow (--token and ORDERFLOW_TOKEN win over it)."""
    if token is None:
        token = typer.prompt("Token", hide_input=True) if sys.stdin.isatty() else sys.stdin.read()
    typer.echo(credentials.login(token.strip(), settings().auth_roles_claim))


@app.command()
def logout() -> None:
    """Remove the token `orderflow login` stored."""
    typer.echo("signed out" if credentials.forget() else "no stored token; nothing to do")


@app.command()
def migrate() -> None:
    """Create the database if it is missing and apply every migration (settings.database_url)."""
    chosen = settings()
    try:
        schema.migrate(connection_security.database_url(chosen), connection_security.postgres_ssl(chosen))
    except Exception as error:  # noqa: BLE001 (any failure is reported as a message, not a traceback)
        if isinstance(error, ConnectionError) or isinstance(error.__cause__, ConnectionError):
            unreachable("PostgreSQL", chosen.database_url, f"{ENV_PREFIX}DATABASE_URL", error)
        fail(f"migration failed: {reason(error)}")
    typer.echo(f"database {make_url(chosen.database_url).database!r} is at the newest migration")


broker_app = typer.Typer(
    name="broker",
    help="Provision RabbitMQ for orderflow, as the administrator settings.amqp_url (env "
    "ORDERFLOW_AMQP_URL) names: the services' own users, then the exchanges and queues.",
    no_args_is_help=True,
)
app.add_typer(broker_app)


@broker_app.command("provision")
def provision_broker(
    passwords: Annotated[
        Path | None,
        typer.Option(
            help="A directory of broker-<account>.password files (gateway, bridge, workers, audit, "
            "operator): create or update those users with only the permissions each needs.",
            exists=True,
            file_okay=False,
        ),
    ] = None,
    management_url: Annotated[
        str | None,
        typer.Option(help="Create the users through this RabbitMQ management API (default: rabbitmqctl)."),
    ] = None,
) -> None:
    """Declare orderflow's exchanges and queues, and create its services' users (who may not declare
    or delete anything)."""
    current = settings()
    try:
        accounts = None if passwords is None else broker_users.read_passwords(passwords)
        asyncio.run(broker_users.provision(current, accounts, management_url))
    except (ConnectionError, AMQPConnectionError) as error:
        unreachable("RabbitMQ", current.amqp_url, f"{ENV_PREFIX}AMQP_URL", error)
    except (broker_users.CannotCreateUsers, OSError, AMQPError) as error:
        fail(f"cannot provision the broker: {reason(error)}")
    typer.echo("the broker is provisioned" + (" with the services' users" if passwords else ""))


dlq_app = typer.Typer(
    name="dlq",
    help=f"Inspect the dead-letter queue ({DEAD_LETTER_QUEUE}) and replay what a consumer "
    "gave up on. Works on the broker that settings.amqp_url (env ORDERFLOW_AMQP_URL) names.",
    no_args_is_help=True,
)
app.add_typer(dlq_app)

WithReason = Annotated[
    str | None,
    typer.Option(
        "--reason",
        help="Only dead letters with this reason: invalid_json, schema_invalid or processing_failed.",
    ),
]
FromConsumer = Annotated[
    str | None,
    typer.Option("--consumer", help="Only dead letters that this consumer gave up on: bridge or audit."),
]


@dlq_app.command("list")
def list_dead_letters(
    limit: Annotated[int, typer.Option("--limit", min=1, help="Show at most this many, oldest first.")] = 50,
    with_reason: WithReason = None,
    from_consumer: FromConsumer = None,
    as_json: AsJson = False,
) -> None:
    """List dead letters, oldest first; the queue is left as it was."""
    current = settings()
    selection = dlq.Selection(reason=with_reason, consumer=from_consumer)
    shown, unread = dlq.run(current, dlq.find(current, selection, limit))
    show(shown, as_json, dlq.summaries, lambda found: [dead_letter.diagnosis() for dead_letter in found])
    if unread:
        # with --reason or --consumer, those behind the last one shown were not looked at
        not_shown = "not searched" if with_reason or from_consumer else "not shown"
        typer.echo(f"{unread} more {not_shown} (--limit)", err=True)


@dlq_app.command("show")
def show_dead_letter(
    message_id: Annotated[str, typer.Argument(help="Its message id (see `orderflow dlq list`).")],
    as_json: AsJson = False,
) -> None:
    """Show one dead letter: why, where it came from, and its body (pretty-printed if JSON)."""
    current = settings()
    (oldest, *copies), _ = dlq.run(current, dlq.find(current, dlq.Selection(frozenset({message_id}))))
    show(oldest, as_json, dlq.details, dlq.in_full)
    if copies:
        typer.echo(f"{len(copies)} more dead letter(s) have this message id", err=True)


@dlq_app.command("replay")
def replay_dead_letters(
    message_ids: Annotated[
        list[str] | None, typer.Argument(metavar="MESSAGE_ID...", help="The dead letters to replay.")
    ] = None,
    replay_all: Annotated[
        bool, typer.Option("--all", help="Replay every dead letter (that --reason and --consumer select).")
    ] = False,
    with_reason: WithReason = None,
    from_consumer: FromConsumer = None,
    exchange: Annotated[
        str | None,
        typer.Option(
            "--exchange",
            help="Where to send dead letters that do not say which exchange they came from (older ones).",
        ),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Replay --all without asking.")] = False,
    as_json: AsJson = False,
) -> None:
    """Republish dead letters to the exchange they came from, and remove them from the queue once
    the broker confirmed them. Safe to repeat: consumers take a command id or event id once."""
    if bool(message_ids) == replay_all:
        raise typer.BadParameter("give message ids or --all (not both)", param_hint="MESSAGE_ID... / --all")
    if (with_reason or from_consumer) and not replay_all:
        raise typer.BadParameter("--reason and --consumer select with --all", param_hint="--all")
    selection = dlq.Selection(frozenset(message_ids or ()), with_reason, from_consumer)
    current = settings()
    if replay_all and not yes:
        chosen, _ = dlq.run(current, dlq.find(current, selection))
        if not chosen:
            fail("no dead letter matches")
        typer.confirm(f"Replay {len(chosen)} dead letter(s) to the exchanges they came from?", abort=True)
    dlq.run(current, dlq.replay(current, selection, exchange, as_json))
