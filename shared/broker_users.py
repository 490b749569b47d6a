"""Least privilege on the broker: one RabbitMQ user per service, allowed only what it uses.

RabbitMQ grants a user, per vhost, three regular expressions over exchange and queue names:
configure (declare, delete), write (publish to an exchange, bind a queue) and read (consume or get
from a queue). No service may configure: an administrator declares the topology once
(`shared.broker.provision`), and a passive declare, which is how a service finds what it uses,
needs no permission at all. The users, their passwords (as salted hashes) and their permissions
are written as RabbitMQ definitions, which `rabbitmqctl import_definitions` (`make run`) or the
broker's `load_definitions` (compose) applies.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
from yarl import URL

from shared import broker
from shared.broker import (
    COMMANDS_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    EVENTS_EXCHANGE,
)
from shared.connection_security import amqp_ssl_context, amqp_url, read_secret
from shared.settings import Settings

NOTHING = "^$"
USER_PREFIX = "orderflow-"
PASSWORD_BYTES = 24
MANAGEMENT_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class Grant:
    """A user's permissions on one vhost, as RabbitMQ's three regular expressions."""

    configure: str = NOTHING
    write: str = NOTHING
    read: str = NOTHING


def only(*names: str) -> str:
    """A permission pattern matching exactly these exchange or queue names."""
    return "^(" + "|".join(re.escape(name) for name in names) + ")$"


def grants(settings: Settings) -> dict[str, Grant]:
    """Each account and what it may do. A dead letter is published to its exchange, and a replay
    to the exchange it came from."""
    return {
        "gateway": Grant(write=only(COMMANDS_EXCHANGE)),
        "bridge": Grant(
            write=only(EVENTS_EXCHANGE, DEAD_LETTER_EXCHANGE),
            read=only(settings.placement_queue, settings.command_queue),
        ),
        "workers": Grant(write=only(EVENTS_EXCHANGE)),
        "audit": Grant(write=only(DEAD_LETTER_EXCHANGE), read=only(settings.audit_queue)),
        "operator": Grant(
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
) -> dict[str, Any]:
    """RabbitMQ definitions creating each account in `passwords` (as `prefix` + account) with
    its permissions on `vhost` (which they create too, if missing)."""
    granted = grants(settings)
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
            {"user": prefix + account, "vhost": vhost, **vars(granted[account])} for account in passwords
        ],
    }


def stored_passwords(directory: Path) -> dict[str, str]:
    """Each account's password, from `directory/broker-<account>.password` (mode 0600), made on
    first use; the services read their own file (`ORDERFLOW_AMQP_PASSWORD_FILE`)."""
    for account in ACCOUNTS:
        path = password_file(directory, account)
        if not path.exists():
            # created 0600 before anything is written to it
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
                file.write(secrets.token_urlsafe(PASSWORD_BYTES))
    return read_passwords(directory)


def read_passwords(directory: Path) -> dict[str, str]:
    """Each account's password, from `directory/broker-<account>.password` (Docker secrets, say)."""
    return {account: read_secret(password_file(directory, account)) for account in ACCOUNTS}


def password_file(directory: Path, account: str) -> Path:
    return directory / f"broker-{account}.password"


class CannotCreateUsers(Exception):
    """rabbitmqctl is missing or refused (it needs root or the rabbitmq user on the broker's host)."""


def import_definitions(content: Mapping[str, Any]) -> None:
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
    """As `settings`' administrative user: the accounts of `passwords` created or brought up to
    date (through the management API at `management_url`, else rabbitmqctl), then the topology."""
    if passwords:
        content = definitions(settings, vhost_of(settings.amqp_url), passwords, prefix)
        if management_url is None:
            await asyncio.to_thread(import_definitions, content)
        else:
            await asyncio.to_thread(post_definitions, management_url, settings, content)
    connection = await broker.connect(settings, "orderflow-provisioning", patience=0)
    async with connection:
        await broker.provision(await connection.channel(), settings)


def post_definitions(management_url: str, settings: Settings, content: Mapping[str, Any]) -> None:
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
    """`make run`: the accounts created (or their permissions brought up to date) and the topology
    declared, as `settings`' administrative user; returns each service's ORDERFLOW_AMQP_* variables."""
    await provision(settings, stored_passwords(secrets_dir), prefix=prefix)
    return {
        service: {
            "ORDERFLOW_AMQP_URL": account_url(settings.amqp_url, account, prefix),
            "ORDERFLOW_AMQP_PASSWORD_FILE": str(password_file(secrets_dir, account).resolve()),
        }
        for service, account in ACCOUNT_OF_SERVICE.items()
    }
