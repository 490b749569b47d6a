"""Least privilege on the broker: one RabbitMQ user per service, allowed only what it uses (no configure:
an administrator provisions the topology), as definitions for `rabbitmqctl` or the management API."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import secrets
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import unquote

import httpx
from pydantic import JsonValue
from yarl import URL

from shared import broker
from shared.broker import COMMANDS_EXCHANGE, DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE, EVENTS_EXCHANGE
from shared.connection_security import amqp_ssl_context, amqp_url, create_private_file, read_secret
from shared.settings import Settings

NOTHING = "^$"
USER_PREFIX = "orderflow-"
PASSWORD_BYTES = 24
MANAGEMENT_TIMEOUT_SECONDS = 30.0


def only(*names: str) -> str:
    """A permission pattern matching exactly these exchange or queue names."""
    return "^(" + "|".join(re.escape(name) for name in names) + ")$"


def grant(*, write: str = NOTHING, read: str = NOTHING) -> dict[str, str]:
    """A user's permissions on one vhost (never configure), as regular expressions over names."""
    return {"configure": NOTHING, "write": write, "read": read}


def grants(settings: Settings) -> dict[str, dict[str, str]]:
    """Each account and what it may do (a replay of a dead letter goes to the exchange it came from)."""
    return {
        "gateway": grant(write=only(COMMANDS_EXCHANGE)),
        "bridge": grant(
            write=only(EVENTS_EXCHANGE, DEAD_LETTER_EXCHANGE),
            read=only(settings.placement_queue, settings.command_queue),
        ),
        "workers": grant(write=only(EVENTS_EXCHANGE)),
        "audit": grant(write=only(DEAD_LETTER_EXCHANGE), read=only(settings.audit_queue)),
        "operator": grant(
            write=only(COMMANDS_EXCHANGE, EVENTS_EXCHANGE, DEAD_LETTER_EXCHANGE),
            read=only(DEAD_LETTER_QUEUE),
        ),
    }


ACCOUNTS = ("gateway", "bridge", "workers", "audit", "operator")
# the account each `make run` service connects as
ACCOUNT_OF_SERVICE = {"api": "gateway", "bridge": "bridge", "workers": "workers", "audit": "audit"}


def password_hash(password: str) -> str:
    """RabbitMQ's `rabbit_password_hashing_sha256`: a 4-byte salt, then SHA-256 of salt + password."""
    salt = secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def definitions(
    settings: Settings, vhost: str, passwords: Mapping[str, str], prefix: str = USER_PREFIX
) -> dict[str, JsonValue]:
    """RabbitMQ definitions of the accounts in `passwords` (user `prefix` + account), granted on `vhost`."""
    return {
        "vhosts": [{"name": vhost}],
        "users": [
            {
                "name": prefix + account,
                "password_hash": password_hash(password),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": [],
            }
            for account, password in passwords.items()
        ],
        "permissions": [
            {"user": prefix + account, "vhost": vhost, **grants(settings)[account]} for account in passwords
        ],
    }


def stored_passwords(directory: Path) -> dict[str, str]:
    """Each account's password, from its `password_file` in `directory`, made on first use."""
    for account in ACCOUNTS:
        path = password_file(directory, account)
        if not path.exists():
            create_private_file(path, secrets.token_urlsafe(PASSWORD_BYTES).encode())
    return read_passwords(directory)


def read_passwords(directory: Path) -> dict[str, str]:
    """Each account's password, from its `password_file` in `directory` (Docker secrets, say)."""
    return {account: read_secret(password_file(directory, account)) for account in ACCOUNTS}


def password_file(directory: Path, account: str) -> Path:
    return directory / f"broker-{account}.password"


class CannotCreateUsers(Exception):
    """rabbitmqctl is missing or refused (it needs root or the rabbitmq user on the broker's host)."""


def import_definitions(content: Mapping[str, JsonValue]) -> None:
    """Apply definitions with rabbitmqctl, over its standard input: no password on a command line."""
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        raise CannotCreateUsers("rabbitmqctl is not on PATH")
    done = subprocess.run(
        [ctl, "-q", "import_definitions", "--format", "json"],  # no file: standard input
        input=json.dumps(content),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip() or f"exit {done.returncode}").splitlines()[0]
        raise CannotCreateUsers(f"rabbitmqctl import_definitions failed: {said}")


def vhost_of(amqp_url: str) -> str:
    """The vhost an AMQP URL names (its path; `/` when it has none)."""
    return unquote(URL(amqp_url).raw_path[1:]) or "/"


def account_url(amqp_url: str, account: str, prefix: str = USER_PREFIX) -> str:
    """`amqp_url` as `account`'s user, without a password (that comes from its file)."""
    return str(URL(amqp_url).with_password(None).with_user(prefix + account))


async def provision(
    settings: Settings,
    passwords: Mapping[str, str] | None = None,
    management_url: str | None = None,
    prefix: str = USER_PREFIX,
) -> None:
    """As administrator: the accounts (through `management_url`, else rabbitmqctl), then the topology."""
    if passwords:
        content = definitions(settings, vhost_of(settings.amqp_url), passwords, prefix)
        if management_url is None:
            await asyncio.to_thread(import_definitions, content)
        else:
            await asyncio.to_thread(post_definitions, management_url, settings, content)
    connection = await broker.connect(settings, "orderflow-provisioning", patience=0)
    async with connection:
        await broker.provision(await connection.channel(), settings)


def post_definitions(management_url: str, settings: Settings, content: Mapping[str, JsonValue]) -> None:
    """Apply definitions through RabbitMQ's management API, as the administrator of `amqp_url`."""
    admin = URL(amqp_url(settings))
    response = httpx.post(
        f"{management_url.rstrip('/')}/api/definitions",
        json=content,
        auth=(admin.user or "guest", admin.password or "guest"),
        verify=amqp_ssl_context(settings) or True,
        timeout=MANAGEMENT_TIMEOUT_SECONDS,
    )
    if response.is_error:  # its body is not repeated: it may quote what was sent
        raise CannotCreateUsers(
            f"the management API answered {response.status_code} {response.reason_phrase}"
        )


async def set_up_accounts(
    settings: Settings, secrets_dir: Path, prefix: str = USER_PREFIX
) -> dict[str, dict[str, str]]:
    """`make run`'s `provision`, with stored passwords: each service's ORDERFLOW_AMQP_* variables."""
    await provision(settings, stored_passwords(secrets_dir), prefix=prefix)
    return {
        service: {
            "ORDERFLOW_AMQP_URL": account_url(settings.amqp_url, account, prefix),
            "ORDERFLOW_AMQP_PASSWORD_FILE": str(password_file(secrets_dir, account).resolve()),
        }
        for service, account in ACCOUNT_OF_SERVICE.items()
    }
