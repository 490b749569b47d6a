"""The bearer token the CLI sends: `--token`, else `ORDERFLOW_TOKEN` (typer reads both), else the
one `orderflow login` stored, readable by its owner only. Only `orderflow token` prints a token."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import jwt

from services.cli.errors import fail
from shared.authorization import role_names


def stored_token_path() -> Path:
    """`$XDG_CONFIG_HOME/orderflow/token` (`~/.config/orderflow/token` by default)."""
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "orderflow" / "token"


def login(token: str, roles_claim: str) -> str:
    """Keep a token that has not expired for later commands, readable by its owner only; says whose."""
    holder, expires_at = claims(token, roles_claim)
    if expires_at is not None and expires_at <= datetime.now(UTC):
        fail(f"this token expired at {expires_at.isoformat(timespec='seconds')}")
    path = stored_token_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # a file left by an older login may be wider
    with os.fdopen(descriptor, "w") as file:
        file.write(token + "\n")
    return f"signed in as {holder}; the token is in {path}"


def forget() -> bool:
    """Remove the stored token; whether there was one."""
    try:
        stored_token_path().unlink()
    except FileNotFoundError:
        return False
    return True


def chosen(given: str | None) -> str | None:
    """The token to send: `given` (the option or ORDERFLOW_TOKEN) unless empty, else the stored one."""
    if given and given.strip():
        return given.strip()
    try:
        return stored_token_path().read_text().strip() or None
    except FileNotFoundError:
        return None


def claims(token: str, roles_claim: str) -> tuple[str, datetime | None]:
    """Who the token says its bearer is, and its expiry: read without verifying it, for display only."""
    try:
        fields = jwt.decode(token, options={"verify_signature": False})
    except jwt.DecodeError:
        fail("this is not a JWT access token (header.payload.signature)")
    named = ", ".join(role_names(fields, roles_claim))
    expiry = fields.get("exp")
    expires_at = datetime.fromtimestamp(expiry, UTC) if isinstance(expiry, int | float) else None
    until = f", until {expires_at.isoformat(timespec='seconds')}" if expires_at else ""
    return f"{fields.get('sub', '(no subject)')} ({named or 'no role'}{until})", expires_at
