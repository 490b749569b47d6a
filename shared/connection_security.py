"""Secrets in files and secured connections: every connection to RabbitMQ and PostgreSQL takes its
password (from a file, never logged) and its TLS context from here."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from sqlalchemy.engine import make_url
from yarl import URL

from shared.settings import Settings

# what asyncpg takes as `ssl`: a context (TLS required), or one of libpq's weaker sslmodes by name
PostgresSSL = ssl.SSLContext | str


def read_secret(path: Path) -> str:
    """A secret file's content, without the line end an editor or `echo` adds."""
    return path.read_text(encoding="utf-8").rstrip("\r\n")


def create_private_file(path: Path, content: bytes) -> None:
    """A new file that only its owner may read: mode 0600 from its creation, before it holds anything."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as file:
        file.write(content)


def amqp_url(settings: Settings) -> str:
    """`amqp_url` with the password from `amqp_password_file`, when one is given."""
    if settings.amqp_password_file is None:
        return settings.amqp_url
    return str(URL(settings.amqp_url).with_password(read_secret(settings.amqp_password_file)))


def amqp_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """For an amqps:// URL: the broker's certificate and name checked, ours presented when given."""
    if URL(settings.amqp_url).scheme != "amqps":
        return None
    return client_context(settings.amqp_ca_file, settings.amqp_cert_file, settings.amqp_key_file)


def database_url(settings: Settings) -> str:
    """`database_url` with the password from `database_password_file`, when one is given."""
    if settings.database_password_file is None:
        return settings.database_url
    url = make_url(settings.database_url).set(password=read_secret(settings.database_password_file))
    return url.render_as_string(hide_password=False)


def postgres_ssl(settings: Settings) -> PostgresSSL:
    """libpq's sslmode semantics: `require` checks nothing unless given a root certificate."""
    mode = settings.database_sslmode
    if mode in ("disable", "allow", "prefer"):  # asyncpg knows these by name
        return mode
    context = client_context(
        settings.database_sslrootcert, settings.database_sslcert, settings.database_sslkey
    )
    context.check_hostname = mode == "verify-full"
    if mode == "require" and settings.database_sslrootcert is None:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(ca_file: Path | None, cert_file: Path | None, key_file: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    if cert_file is not None:
        context.load_cert_chain(cert_file, key_file)
    return context
