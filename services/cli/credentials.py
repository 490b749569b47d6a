"""The bearer token the CLI sends: `--token`, else `ORDERFLOW_TOKEN` (typer reads both), else the
one `orderflow login` stored in the user's config directory, readable by its owner only. A token
is never printed back, except by `orderflow token`, which is asked for one."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import jwt

STORED_TOKEN_MODE = 0o600
CONFIG_DIR_MODE = 0o700


class NotAToken(Exception):
    """The text is not a JWT whose claims can be read (the gateway verifies it; this only reads)."""


@dataclass(frozen=True)
class TokenClaims:
    """What a token says of its bearer, read without verifying it: for display only."""

    subject: str
    roles: list[str]
    expires_at: datetime | None

    def describe(self) -> str:
        roles = ", ".join(self.roles) or "no role"
        until = f", until {self.expires_at.isoformat(timespec='seconds')}" if self.expires_at else ""
        return f"{self.subject} ({roles}{until})"


def stored_token_path() -> Path:
    """`$XDG_CONFIG_HOME/orderflow/token` (`~/.config/orderflow/token` by default)."""
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "orderflow" / "token"


def store(token: str) -> Path:
    """Keep `token` for later commands, readable by its owner only; returns where."""
    path = stored_token_path()
    path.parent.mkdir(mode=CONFIG_DIR_MODE, parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, STORED_TOKEN_MODE)
    os.fchmod(descriptor, STORED_TOKEN_MODE)  # a file left by an older login may be wider
    with os.fdopen(descriptor, "w") as file:
        file.write(token + "\n")
    return path


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


def claims(token: str, roles_claim: str) -> TokenClaims:
    """The subject, roles (under the dotted `roles_claim`) and expiry the token claims."""
    try:
        fields = jwt.decode(token, options={"verify_signature": False})
    except jwt.DecodeError:
        raise NotAToken("this is not a JWT access token (header.payload.signature)") from None
    roles: object = fields
    for part in roles_claim.split("."):
        roles = roles.get(part) if isinstance(roles, dict) else None
    if isinstance(roles, str):
        roles = roles.split()
    expiry = fields.get("exp")
    return TokenClaims(
        subject=str(fields.get("sub", "(no subject)")),
        roles=[str(role) for role in roles] if isinstance(roles, list) else [],
        expires_at=datetime.fromtimestamp(expiry, UTC) if isinstance(expiry, int | float) else None,
    )
