"""Who is calling: JWT bearer tokens verified against their issuer's keys (a JWKS or the local
development issuer). A route admits roles as scopes: no or a bad token is a 401, no such role a 403.
Tokens and keys are never logged."""

from __future__ import annotations

import asyncio
import ipaddress
import math
import time
from collections.abc import Callable, Mapping
from typing import Annotated, cast
from urllib.parse import urlsplit

import httpx
import jwt
import structlog
from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes
from jwt.algorithms import HMACAlgorithm, NoneAlgorithm, get_default_algorithms
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.errors import Responses, json_error
from shared import local_issuer
from shared.authorization import ROLES_FOR, role_names
from shared.contracts import Actor, CommandType, Role
from shared.db import Order
from shared.probes import DependencyUnavailable, describe
from shared.settings import Settings

# claims a token must carry; `nbf` is checked when present
REQUIRED_CLAIMS = ["exp", "iat", "sub", "iss", "aud"]
# a token naming a key the cached JWKS lacks refetches it at most this often, so forged tokens
# cannot make the gateway hammer its issuer
UNKNOWN_KEY_REFETCH_SECONDS = 10.0
JWKS_FETCH_TIMEOUT_SECONDS = 5.0
ROLE_NAMES = frozenset(role.value for role in Role)
# the public-key signatures PyJWT knows: neither `none` nor an HMAC, whose key would be a shared secret
ASYMMETRIC_ALGORITHMS = frozenset(
    name
    for name, algorithm in get_default_algorithms().items()
    if not isinstance(algorithm, NoneAlgorithm | HMACAlgorithm)
)

log = structlog.get_logger(__name__)


class AuthNotConfigured(Exception):
    """No issuer to trust, or one configured half: the gateway does not start open."""


class InvalidToken(Exception):
    """The bearer token is not one the gateway accepts; the message says why (never the token)."""


class KeySet:
    """The signing keys of one JWKS document, by key id (`kid`), parsed once per algorithm."""

    def __init__(self, jwks: Mapping[str, object]) -> None:
        keys = jwks.get("keys")
        self._keys: dict[str | None, dict[str, object]] = {
            key.get("kid"): key
            for key in (keys if isinstance(keys, list) else [])
            if isinstance(key, dict) and key.get("use", "sig") == "sig"
        }
        self._parsed: dict[tuple[str | None, str], jwt.PyJWK] = {}

    def __contains__(self, kid: str | None) -> bool:
        return kid in self._keys

    def key(self, kid: str | None, algorithm: str) -> jwt.PyJWK:
        # a key naming its own `alg` keeps it: a token claiming another then fails the signature check
        if (kid, algorithm) not in self._parsed:
            jwk = self._keys.get(kid)
            if jwk is None:
                raise InvalidToken("the token's signing key is not among its issuer's keys")
            try:
                self._parsed[kid, algorithm] = jwt.PyJWK(jwk, algorithm=str(jwk.get("alg") or algorithm))
            except jwt.PyJWTError as error:
                raise InvalidToken(f"the issuer's key {kid!r} cannot verify {algorithm}") from error
        return self._parsed[kid, algorithm]

    async def keys_for(self, kid: str | None) -> KeySet:
        """Keys known at start-up (the local development issuer's) are their own source."""
        return self


class PublishedKeys:
    """An issuer's JWKS, fetched when first needed, trusted for `cache_seconds`, and fetched again
    sooner (at most every `UNKNOWN_KEY_REFETCH_SECONDS`) for a key id it lacks: the issuer has rotated."""

    def __init__(self, url: str, cache_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._url = url
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._keys: KeySet | None = None
        self._fetched_at = -math.inf
        self._attempted_at = -math.inf
        self._lock = asyncio.Lock()  # one fetch at a time, whatever the number of requests waiting

    async def keys_for(self, kid: str | None) -> KeySet:
        async with self._lock:
            now = self._clock()
            expired = now - self._fetched_at >= self._cache_seconds
            rotated = self._keys is not None and kid not in self._keys
            if (expired or rotated) and now - self._attempted_at >= UNKNOWN_KEY_REFETCH_SECONDS:
                self._attempted_at = now
                await self._fetch(now)
            if self._keys is None or now - self._fetched_at >= self._cache_seconds:
                raise DependencyUnavailable("issuer", f"its signing keys cannot be fetched from {self._url}")
            return self._keys

    async def _fetch(self, now: float) -> None:
        try:
            async with httpx.AsyncClient(timeout=JWKS_FETCH_TIMEOUT_SECONDS) as client:
                response = await client.get(self._url, headers={"Accept": "application/json"})
                response.raise_for_status()
                keys = KeySet(response.json())
        except (httpx.HTTPError, ValueError) as error:
            log.warning("issuer keys not fetched", url=self._url, reason=describe(error))
            return
        self._keys, self._fetched_at = keys, now
        log.info("issuer keys fetched", url=self._url)


KeySource = KeySet | PublishedKeys


def check_jwks_url(url: str) -> None:
    """Keys travel over HTTPS; plain HTTP only from this machine (a local issuer or a test)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not host or not (parts.scheme == "https" or (parts.scheme == "http" and loopback)):
        raise AuthNotConfigured(
            "ORDERFLOW_AUTH_JWKS_URL should be an https:// URL (http:// only on loopback)"
        )


class TokenVerifier:
    """Turns a bearer token into the `Actor` it was issued to, or raises `InvalidToken`."""

    def __init__(self, settings: Settings, issuers: dict[str, KeySource]) -> None:
        self._settings = settings
        self._issuers = issuers

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenVerifier:
        """Trusts the configured issuers; raises `AuthNotConfigured` when none is (fully) configured, or
        for another configuration the gateway must not start with."""
        unsafe = [name for name in settings.auth_algorithms if name not in ASYMMETRIC_ALGORITHMS]
        if unsafe:
            raise AuthNotConfigured(
                f"ORDERFLOW_AUTH_ALGORITHMS may name asymmetric signatures only, not {', '.join(unsafe)}"
            )
        if bool(settings.auth_issuer) != bool(settings.auth_jwks_url):
            raise AuthNotConfigured("ORDERFLOW_AUTH_ISSUER and ORDERFLOW_AUTH_JWKS_URL go together: set both")
        issuers: dict[str, KeySource] = {}  # `iss` -> where its keys come from
        if settings.auth_issuer:
            check_jwks_url(settings.auth_jwks_url)
            issuers[settings.auth_issuer] = PublishedKeys(
                settings.auth_jwks_url, settings.auth_jwks_cache_seconds
            )
        if settings.auth_local_issuer:
            try:
                jwks = local_issuer.public_jwks(settings.auth_local_issuer_key_file)
            except local_issuer.NoLocalIssuer as error:
                raise AuthNotConfigured(str(error)) from None
            issuers[local_issuer.ISSUER] = KeySet(jwks)
        if not issuers:
            raise AuthNotConfigured(
                "no token issuer is configured: set ORDERFLOW_AUTH_ISSUER and ORDERFLOW_AUTH_JWKS_URL, or "
                "ORDERFLOW_AUTH_LOCAL_ISSUER=true for development (the gateway never runs without auth)"
            )
        return cls(settings, issuers)

    async def actor(self, token: str) -> Actor:
        try:
            # which issuer's keys to check it with; the checked token must then name that issuer
            unverified = jwt.decode_complete(token, options={"verify_signature": False})
        except jwt.PyJWTError as error:
            raise InvalidToken("the token is not a well-formed JWT") from error
        header, issuer = unverified["header"], unverified["payload"].get("iss")
        settings = self._settings
        algorithm = header.get("alg")
        if algorithm not in settings.auth_algorithms:
            raise InvalidToken(f"tokens signed with {algorithm!r} are not accepted")
        source = self._issuers.get(issuer) if isinstance(issuer, str) else None
        if source is None:
            raise InvalidToken("the token's issuer is not trusted")
        kid = header.get("kid")
        key = (await source.keys_for(kid)).key(kid, algorithm)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=settings.auth_algorithms,
                audience=settings.auth_audience,
                issuer=issuer,
                leeway=settings.auth_clock_skew_seconds,
                options={"require": REQUIRED_CLAIMS},
            )
            names = role_names(claims, settings.auth_roles_claim)  # those orderflow does not know are ignored
            return Actor(subject=claims["sub"], roles=frozenset(map(Role, ROLE_NAMES.intersection(names))))
        except jwt.PyJWTError as error:
            raise InvalidToken(describe(error)) from error
        except ValidationError as error:
            raise InvalidToken("the token's subject is not a valid subject") from error


bearer_token = HTTPBearer(
    auto_error=False,  # a missing token is answered below, with the header RFC 6750 asks for
    scheme_name="bearer",
    bearerFormat="JWT",
    description="An access token of the configured issuer, its roles (`customer`, `reviewer`, "
    "`operator`) in the roles claim. Under `make run`: `orderflow token --role reviewer --subject "
    "rita` prints one. Each operation lists the roles it admits; any one of them will do.",
)


def get_verifier(request: Request) -> TokenVerifier:
    return cast(TokenVerifier, request.app.state.token_verifier)


async def current_actor(
    security_scopes: SecurityScopes,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_token)],
    verifier: Annotated[TokenVerifier, Depends(get_verifier)],
) -> Actor:
    """The caller, who holds one of the roles named as scopes (no scopes: any valid token)."""
    if credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="a bearer token is required (Authorization: Bearer <token>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    try:
        actor = await verifier.actor(credentials.credentials)
    except InvalidToken as invalid:
        log.info("bearer token refused", reason=str(invalid))
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail=f"invalid bearer token: {invalid}",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        ) from None
    if security_scopes.scopes and not actor.has(*map(Role, security_scopes.scopes)):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail=f"this needs one of the roles {', '.join(security_scopes.scopes)}",
            headers={
                "WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{security_scopes.scope_str}"'
            },
        )
    return actor


def roles(*admitted: Role) -> list[str]:
    return sorted(role.value for role in admitted)


AnyRole = Annotated[Actor, Security(current_actor, scopes=roles(*Role))]
"""A caller with any role; what a customer may see is narrowed by the route."""
Overseer = Annotated[Actor, Security(current_actor, scopes=roles(Role.REVIEWER, Role.OPERATOR))]
"""A reviewer or an operator: sees every order."""
Placer = Annotated[Actor, Security(current_actor, scopes=roles(*ROLES_FOR[CommandType.PLACE]))]
Approver = Annotated[Actor, Security(current_actor, scopes=roles(*ROLES_FOR[CommandType.APPROVE]))]
Canceller = Annotated[Actor, Security(current_actor, scopes=roles(*ROLES_FOR[CommandType.CANCEL]))]
Readdresser = Annotated[Actor, Security(current_actor, scopes=roles(*ROLES_FOR[CommandType.UPDATE_ADDRESS]))]


def sees_every_order(actor: Actor) -> bool:
    return actor.has(Role.REVIEWER, Role.OPERATOR)


def may_read(actor: Actor, placed_by: str | None) -> bool:
    """A reviewer or operator reads every order; a customer only those it placed."""
    return sees_every_order(actor) or (placed_by is not None and placed_by == actor.subject)


async def readable_by(session: AsyncSession, actor: Actor, order_id: str) -> bool:
    """`may_read` by the order's id: a customer's own are those the orders table says it placed."""
    if sees_every_order(actor):
        return True
    order = await session.get(Order, order_id)
    return order is not None and may_read(actor, order.placed_by)


AUTH_RESPONSES: Responses = {
    status.HTTP_401_UNAUTHORIZED: json_error(
        "No bearer token, or one that is expired, not yet valid, badly signed, or for another "
        "issuer or audience (`WWW-Authenticate: Bearer`)."
    ),
    status.HTTP_403_FORBIDDEN: json_error("The token is valid but holds none of the roles this needs."),
}
