"""The bearer token the CLI sends to the gateway, and where it comes from.

First wins: the `--token` option, the `ORDERFLOW_TOKEN` environment variable (typer reads both),
then the token `orderflow login` stored in the user's config directory (readable by its owner
only). A token is never printed back, except by `orderflow token`, which is asked for one.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

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


def stored() -> str | None:
    try:
        return stored_token_path().read_text().strip() or None
    except FileNotFoundError:
        return None


def chosen(given: str | None) -> str | None:
    """The token to send: `given` (the option or ORDERFLOW_TOKEN) unless empty, else the stored one."""
    return given.strip() if given and given.strip() else stored()


def claims(token: str, roles_claim: str) -> TokenClaims:
    """The subject, roles (under the dotted `roles_claim`) and expiry the token claims."""
    try:
        payload = token.split(".")[1]
        fields: object = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error):
        raise NotAToken("this is not a JWT access token (header.payload.signature)") from None
    if not isinstance(fields, dict):
        raise NotAToken("this token's payload is not a set of claims")
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
