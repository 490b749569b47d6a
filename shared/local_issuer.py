"""The local development issuer: a signing key on disk (owner-only, in `.run/`) that mints bearer tokens
for `make run`; the gateway trusts it only with `ORDERFLOW_AUTH_LOCAL_ISSUER=true`."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from pydantic import JsonValue

from shared.connection_security import create_private_file
from shared.contracts import Role

if TYPE_CHECKING:
    from shared.settings import Settings

ISSUER = "orderflow-local"  # the `iss` of its tokens
ALGORITHM = "ES256"
KEY_ID_LENGTH = 16


class NoLocalIssuer(Exception):
    """No local issuer is configured (or its key is missing): nothing can mint a token."""


def under_make_run(settings: Settings) -> bool:
    """Whether `make run` and `orderflow token` use the local issuer: yes unless the setting says no."""
    return settings.auth_local_issuer or "auth_local_issuer" not in settings.model_fields_set


def ensure_key(path: Path) -> None:
    """Create the issuer's private key at `path` unless it exists."""
    if not path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        create_private_file(path, pem)


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError as missing:
        raise NoLocalIssuer(
            f"the local issuer's key {path} does not exist (`make run` creates it)"
        ) from missing
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise NoLocalIssuer(f"{path} is not an EC private key")
    return key


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """A stable id derived from the public key, so a new key has a new id (rotation)."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:KEY_ID_LENGTH]


def public_jwk_of(public_key: ec.EllipticCurvePublicKey, kid: str) -> dict[str, object]:
    jwk: dict[str, object] = ECAlgorithm.to_jwk(public_key, as_dict=True)
    return {**jwk, "kid": kid, "alg": ALGORITHM, "use": "sig"}


def public_jwks(path: Path) -> dict[str, list[dict[str, object]]]:
    """The issuer's JWKS (its one public key), as an issuer's `jwks_uri` would serve it."""
    public_key = load_private_key(path).public_key()
    return {"keys": [public_jwk_of(public_key, kid=key_id(public_key))]}


def mint_token(
    settings: Settings,
    subject: str,
    roles: Iterable[Role],
    *,
    lifetime_seconds: int | None = None,
    now: float | None = None,
) -> str:
    """A signed access token for `subject` with `roles`, as the gateway `settings` describe expects it."""
    private_key = load_private_key(settings.auth_local_issuer_key_file)
    issued_at = int(time.time() if now is None else now)
    lifetime = settings.auth_local_token_lifetime_seconds if lifetime_seconds is None else lifetime_seconds
    claims: dict[str, JsonValue] = {
        "iss": ISSUER,
        "aud": settings.auth_audience,
        "sub": subject,
        "iat": issued_at,
        "nbf": issued_at,
        "exp": issued_at + lifetime,
        **nested_claim(settings.auth_roles_claim, [role.value for role in roles]),
    }
    kid = key_id(private_key.public_key())
    return jwt.encode(claims, private_key, algorithm=ALGORITHM, headers={"kid": kid})


def nested_claim(path: str, value: JsonValue) -> dict[str, JsonValue]:
    """`value` under the claim `path`; dots nest, as Keycloak's `realm_access.roles`."""
    *parents, leaf = path.split(".")
    claim: dict[str, JsonValue] = {leaf: value}
    for parent in reversed(parents):
        claim = {parent: claim}
    return claim
