"""Who may do what at the gateway: every route × every kind of caller, four eyes, a cross-site form
post, the issuer's keys (JWKS: rotation, expiry, rate-limited refetches), and no start without auth.

The gateway runs in process against the test database, vhost and dev server; tokens come from the
session's local issuer (`bearer`) or are forged here with keys it does not trust.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractQueue
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.routing import iter_route_contexts
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from devstack.stack import service_environment
from services.api.app import create_app
from services.api.auth import (
    AuthNotConfigured,
    InvalidToken,
    PublishedKeys,
    TokenVerifier,
)
from shared import local_issuer
from shared.authorization import role_names
from shared.contracts import Actor, EventType, OrderState, Role, command_adapter
from shared.probes import DependencyUnavailable
from shared.settings import Settings
from testsupport.amqp import drain, next_message
from testsupport.gateway import bearer, gateway, serving
from testsupport.orders import ADDRESS, order_body, unique_id
from testsupport.read_model import insert_events, insert_order

CUSTOMER, OTHER_CUSTOMER, REVIEWER, OPERATOR = "cara", "cole", "rita", "olivia"
OPEN = 200  # what every caller gets from an open route, token or not
ANY = -1  # allowed: anything but 401, 403 and a server error (the codec's answer depends on its keys)


@dataclass(frozen=True)
class Access:
    """What one route answers: its request, then the status for each kind of caller, on an order
    that `CUSTOMER` placed (and that has ended, so its event stream ends)."""

    body: dict[str, Any] | None
    anonymous: int
    customer: int
    other_customer: int
    reviewer: int
    operator: int
    no_role: int


def open_route() -> Access:
    return Access(None, OPEN, OPEN, OPEN, OPEN, OPEN, OPEN)


def protected(
    customer: int, other_customer: int, reviewer: int, operator: int, body: dict[str, Any] | None = None
) -> Access:
    return Access(body, 401, customer, other_customer, reviewer, operator, no_role=403)


# one payload that was never encrypted: the codec gives it back as it is
PAYLOADS: dict[str, Any] = {
    "payloads": [{"metadata": {"encoding": base64.b64encode(b"json/plain").decode()}, "data": "MQ=="}]
}
# every route of the gateway and who gets what; a route missing here fails the matrix
MATRIX: dict[tuple[str, str], Access] = {
    #                                                customer  other  reviewer operator
    ("POST", "/orders"): protected(202, 202, 403, 202, body=order_body()),
    ("GET", "/orders"): protected(200, 200, 200, 200),
    ("GET", "/orders/{order_id}"): protected(200, 404, 200, 200),
    ("GET", "/orders/{order_id}/events"): protected(200, 404, 200, 200),
    ("GET", "/orders/{order_id}/events/stream"): protected(200, 404, 200, 200),
    ("POST", "/orders/{order_id}/approve"): protected(403, 403, 202, 202),
    ("POST", "/orders/{order_id}/cancel"): protected(202, 403, 202, 202),
    ("POST", "/orders/{order_id}/address"): protected(202, 403, 403, 202, body={"address": ADDRESS}),
    ("GET", "/events/stream"): protected(403, 403, 200, 200),
    ("GET", "/stats"): protected(403, 403, 200, 200),
    ("POST", "/codec/decode"): protected(403, 403, 403, ANY, body=PAYLOADS),
    ("POST", "/codec/encode"): protected(403, 403, 403, ANY, body=PAYLOADS),
    ("POST", "/codec/session"): protected(403, 403, 403, 204),
    # clearing the codec cookie takes any valid token, one without a role too
    ("DELETE", "/codec/session"): Access(None, 401, 204, 204, 204, 204, no_role=204),
    # probes and metrics stay open for the machines that ask; the dashboard page is the sign-in
    # page (its data comes from the routes above); the API's documentation is public
    ("GET", "/healthz"): open_route(),
    ("GET", "/readyz"): open_route(),
    ("GET", "/metrics"): open_route(),
    ("GET", "/dashboard"): open_route(),
    ("GET", "/dashboard/static"): open_route(),
    ("GET", "/openapi.json"): open_route(),
    ("GET", "/docs"): open_route(),
    ("GET", "/docs/oauth2-redirect"): open_route(),
    ("GET", "/redoc"): open_route(),
}
# what is requested of a route (its template filled in, a stream told to end at once)
CONCRETE_PATHS = {
    "/dashboard/static": "/dashboard/static/dashboard.js",
    "/events/stream": "/events/stream?last_event_id=0&limit=1",
}


def gateway_routes() -> list[tuple[str, str]]:
    """Every (method, path template) the gateway serves, as its router has them."""
    app = create_app(Settings())
    routes: set[tuple[str, str]] = set()
    for route in iter_route_contexts(app.routes):
        assert route.path is not None
        for method in route.methods or {"GET"}:  # a mount serves GET
            if method != "HEAD":
                routes.add((method, route.path))
    return sorted(routes)


ROUTES = gateway_routes()


# --- tokens ---------------------------------------------------------------------------------------
def claims(settings: Settings, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    return {
        "iss": local_issuer.ISSUER,
        "aud": settings.auth_audience,
        "sub": CUSTOMER,
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        settings.auth_roles_claim: [Role.CUSTOMER.value],
    } | overrides


def trusted_kid(settings: Settings) -> str:
    return local_issuer.key_id(
        local_issuer.load_private_key(settings.auth_local_issuer_key_file).public_key()
    )


def signed(settings: Settings, payload: dict[str, Any], key: ec.EllipticCurvePrivateKey | None = None) -> str:
    """`payload` signed by the local issuer's key (or `key`, under the trusted key's id)."""
    key = key or local_issuer.load_private_key(settings.auth_local_issuer_key_file)
    return jwt.encode(payload, key, algorithm="ES256", headers={"kid": trusted_kid(settings)})


def encoded(value: dict[str, Any] | bytes) -> str:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unsigned(payload: dict[str, Any]) -> str:
    """A token with `alg: none` and no signature, as an attacker writes it."""
    return f"{encoded({'alg': 'none', 'typ': 'JWT'})}.{encoded(payload)}."


def hmac_signed(payload: dict[str, Any], secret: bytes, kid: str) -> str:
    """A token with `alg: HS256` keyed with `secret` (PyJWT will not make one with a public key)."""
    signing_input = f"{encoded({'alg': 'HS256', 'typ': 'JWT', 'kid': kid})}.{encoded(payload)}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{encoded(signature)}"


def forged_tokens(settings: Settings) -> dict[str, str]:
    """Tokens the gateway must refuse (401), each for one reason."""
    stranger = ec.generate_private_key(ec.SECP256R1())
    public_pem = (
        local_issuer.load_private_key(settings.auth_local_issuer_key_file)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    now = int(time.time())
    return {
        "expired": signed(settings, claims(settings, iat=now - 3600, nbf=now - 3600, exp=now - 600)),
        "not yet valid": signed(settings, claims(settings, nbf=now + 600)),
        "wrong audience": signed(settings, claims(settings, aud="another-service")),
        "wrong issuer": signed(settings, claims(settings, iss="https://issuer.example")),
        "wrong signature": signed(settings, claims(settings), key=stranger),
        "alg none": unsigned(claims(settings)),
        "unknown kid": jwt.encode(
            claims(settings), stranger, algorithm="ES256", headers={"kid": "rotated-away"}
        ),
        # the classic confusion: HMAC keyed with the issuer's public key
        "hmac with the public key": hmac_signed(claims(settings), public_pem, trusted_kid(settings)),
        "no subject": signed(settings, {k: v for k, v in claims(settings).items() if k != "sub"}),
        "not a jwt": "not-a-token",
    }


# --- the matrix -----------------------------------------------------------------------------------
@pytest_asyncio.fixture(scope="module")
async def api(
    settings: Settings, db_sessions: async_sessionmaker[AsyncSession]
) -> AsyncIterator[httpx.AsyncClient]:
    async with gateway(settings) as client:
        yield client


@pytest_asyncio.fixture(scope="module")
async def ended_order(db_sessions: async_sessionmaker[AsyncSession]) -> str:
    """An order `CUSTOMER` placed, in review by the orders table, its events ending."""
    order_id = unique_id("authz")
    await insert_order(db_sessions, order_id, OrderState.AWAITING_APPROVAL, placed_by=CUSTOMER)
    await insert_events(db_sessions, order_id, {1: EventType.RECEIVED, 2: EventType.CANCELLED})
    return order_id


def callers(settings: Settings) -> dict[str, dict[str, str]]:
    return {
        "anonymous": {},
        "customer": bearer(settings, CUSTOMER, Role.CUSTOMER),
        "other_customer": bearer(settings, OTHER_CUSTOMER, Role.CUSTOMER),
        "reviewer": bearer(settings, REVIEWER, Role.REVIEWER),
        "operator": bearer(settings, OPERATOR, Role.OPERATOR),
        "no_role": bearer(settings, "nobody"),
    }


async def call(
    api: httpx.AsyncClient, method: str, template: str, order_id: str, headers: dict[str, str]
) -> httpx.Response:
    access = MATRIX[method, template]
    path = CONCRETE_PATHS.get(template, template).replace("{order_id}", order_id)
    response = await api.request(method, path, json=access.body, headers=headers)
    api.cookies.clear()  # a caller is its headers alone: the codec session cookie is not kept for the next
    return response


@pytest.mark.parametrize(("method", "template"), ROUTES)
async def test_every_route_answers_each_caller_as_the_matrix_says(
    api: httpx.AsyncClient, settings: Settings, ended_order: str, method: str, template: str
) -> None:
    assert (method, template) in MATRIX, f"{method} {template} has no authorization decision in MATRIX"
    access = MATRIX[method, template]
    for caller, headers in callers(settings).items():
        response = await call(api, method, template, ended_order, headers)
        expected = getattr(access, caller)
        if expected == ANY:
            assert response.status_code not in (401, 403) and response.status_code < 500, (
                caller,
                response.text,
            )
        else:
            assert response.status_code == expected, (caller, response.text)
        if response.status_code == 401:
            assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize(("method", "template"), ROUTES)
async def test_no_route_takes_a_forged_expired_or_foreign_token(
    api: httpx.AsyncClient, settings: Settings, ended_order: str, method: str, template: str
) -> None:
    opened = MATRIX[method, template].anonymous == OPEN
    for reason, token in forged_tokens(settings).items():
        response = await call(api, method, template, ended_order, {"Authorization": f"Bearer {token}"})

        if opened:
            assert response.status_code == OPEN, reason
        else:
            assert response.status_code == 401, (reason, response.text)
            assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
            assert token not in response.text


async def test_a_token_of_the_session_is_accepted_only_within_its_clock_skew(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    now = int(time.time())
    within = signed(settings, claims(settings, exp=now - settings.auth_clock_skew_seconds // 2))
    beyond = signed(settings, claims(settings, exp=now - settings.auth_clock_skew_seconds - 5))

    assert (await api.get("/orders", headers={"Authorization": f"Bearer {within}"})).status_code == 200
    assert (await api.get("/orders", headers={"Authorization": f"Bearer {beyond}"})).status_code == 401


# --- what a customer sees -------------------------------------------------------------------------
async def test_a_customer_lists_only_its_own_orders(
    api: httpx.AsyncClient, settings: Settings, db_sessions: async_sessionmaker[AsyncSession]
) -> None:
    own, others = unique_id("own"), unique_id("others")
    await insert_order(db_sessions, own, OrderState.PAID, placed_by=CUSTOMER)
    await insert_order(db_sessions, others, OrderState.PAID, placed_by=OTHER_CUSTOMER)

    mine = await api.get("/orders", params={"limit": 200}, headers=bearer(settings, CUSTOMER, Role.CUSTOMER))
    everyone = await api.get(
        "/orders", params={"limit": 200}, headers=bearer(settings, REVIEWER, Role.REVIEWER)
    )

    listed = {order["order_id"] for order in mine.json()["items"]}
    assert own in listed and others not in listed
    assert {own, others} <= {order["order_id"] for order in everyone.json()["items"]}


# --- four eyes ------------------------------------------------------------------------------------
async def test_nobody_approves_an_order_they_placed(
    api: httpx.AsyncClient, settings: Settings, db_sessions: async_sessionmaker[AsyncSession]
) -> None:
    order_id = unique_id("eyes")
    await insert_order(db_sessions, order_id, OrderState.AWAITING_APPROVAL, placed_by="dana")

    by_the_placer = await api.post(
        f"/orders/{order_id}/approve", headers=bearer(settings, "dana", Role.CUSTOMER, Role.REVIEWER)
    )
    by_an_operator_placer = await api.post(
        f"/orders/{order_id}/approve", headers=bearer(settings, "dana", Role.OPERATOR)
    )
    by_another = await api.post(
        f"/orders/{order_id}/approve", headers=bearer(settings, REVIEWER, Role.REVIEWER)
    )

    assert by_the_placer.status_code == by_an_operator_placer.status_code == 403
    assert "four eyes" in by_the_placer.json()["detail"]
    assert by_another.status_code == 202


async def test_a_command_for_an_order_not_yet_in_the_table_carries_its_issuer_for_the_bridge(
    api: httpx.AsyncClient, settings: Settings, command_queue: AbstractQueue
) -> None:
    response = await api.post(
        f"/orders/{unique_id('early')}/approve", headers=bearer(settings, REVIEWER, Role.REVIEWER)
    )

    assert response.status_code == 202, response.text
    message = await next_message(
        command_queue, lambda found: found.message_id == response.json()["command_id"]
    )
    command = command_adapter.validate_json(message.body)
    assert command.issued_by == Actor(subject=REVIEWER, roles=frozenset({Role.REVIEWER}))


# --- a cross-site form post -----------------------------------------------------------------------
@pytest.mark.parametrize("action", ["approve", "cancel", "address"])
async def test_a_cross_site_form_post_changes_nothing(
    api: httpx.AsyncClient, ended_order: str, command_queue: AbstractQueue, action: str
) -> None:
    """What a plain HTML form on any web page makes a browser send: no credentials ride along."""
    response = await api.post(
        f"/orders/{ended_order}/{action}",
        content=b"note=approved",
        headers={"Content-Type": "application/x-www-form-urlencoded", "Origin": "https://evil.example"},
    )

    assert response.status_code == 401
    assert await drain(command_queue) == []


# --- the issuer's keys (JWKS) ---------------------------------------------------------------------
ISSUER = "https://issuer.test/realms/orderflow"


class JwksServer:
    """A JWKS endpoint on loopback whose keys a test sets, counting the times it is read."""

    def __init__(self) -> None:
        self.keys: list[ec.EllipticCurvePrivateKey] = []
        self.fetches = 0
        self.url = ""

    def document(self) -> bytes:
        self.fetches += 1
        return json.dumps({"keys": [self.jwk(key) for key in self.keys]}).encode()

    @staticmethod
    def jwk(key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
        public = key.public_key()
        return local_issuer.public_jwk_of(public, kid=local_issuer.key_id(public))

    @contextmanager
    def serving(self) -> Iterator[JwksServer]:
        with serving(self.document, "application/json") as port:
            self.url = f"http://127.0.0.1:{port}/jwks"
            yield self


@pytest.fixture
def jwks() -> Iterator[JwksServer]:
    with JwksServer().serving() as server:
        yield server


def issuer_settings(base_settings: Settings, jwks_url: str, **changes: Any) -> Settings:
    return base_settings.model_copy(
        update={
            "auth_issuer": ISSUER,
            "auth_jwks_url": jwks_url,
            "auth_local_issuer": False,
            **changes,
        }
    )


def issued(settings: Settings, key: ec.EllipticCurvePrivateKey, subject: str = REVIEWER) -> str:
    payload = claims(settings, iss=ISSUER, sub=subject)
    return jwt.encode(payload, key, algorithm="ES256", headers={"kid": local_issuer.key_id(key.public_key())})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def verifier_of(settings: Settings, clock: Clock) -> TokenVerifier:
    keys = PublishedKeys(settings.auth_jwks_url, cache_seconds=300, clock=clock)
    return TokenVerifier(settings, {ISSUER: keys})


async def test_a_new_key_id_is_fetched_at_most_every_few_seconds(
    base_settings: Settings, jwks: JwksServer
) -> None:
    settings, clock = issuer_settings(base_settings, jwks.url), Clock()
    verifier = verifier_of(settings, clock)
    old, new = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    jwks.keys = [old]
    assert (await verifier.actor(issued(settings, old))).subject == REVIEWER
    jwks.keys = [old, new]  # the issuer rotates: its next tokens are signed by a new key

    clock.now += 1
    with pytest.raises(InvalidToken):  # a kid fetched for a second ago is not fetched again
        await verifier.actor(issued(settings, new))
    fetches_while_limited = jwks.fetches
    clock.now += 10
    rotated = await verifier.actor(issued(settings, new))

    assert fetches_while_limited == 1
    assert rotated.roles == {Role.CUSTOMER}
    assert jwks.fetches == 2
    assert (await verifier.actor(issued(settings, old))).subject == REVIEWER  # both keys now
    assert jwks.fetches == 2


async def test_cached_keys_expire(base_settings: Settings, jwks: JwksServer) -> None:
    settings, clock = issuer_settings(base_settings, jwks.url), Clock()
    verifier = verifier_of(settings, clock)
    retired = ec.generate_private_key(ec.SECP256R1())
    jwks.keys = [retired]
    await verifier.actor(issued(settings, retired))
    jwks.keys = [ec.generate_private_key(ec.SECP256R1())]  # the issuer withdraws the key

    clock.now += 299
    still_cached = await verifier.actor(issued(settings, retired))
    clock.now += 1
    with pytest.raises(InvalidToken):
        await verifier.actor(issued(settings, retired))

    assert still_cached.subject == REVIEWER
    assert jwks.fetches == 2


async def test_an_issuer_whose_keys_cannot_be_read_is_a_dependency_down(base_settings: Settings) -> None:
    with JwksServer().serving() as gone:
        url = gone.url
    settings = issuer_settings(base_settings, url)
    verifier = verifier_of(settings, Clock())

    with pytest.raises(DependencyUnavailable):
        await verifier.actor(issued(settings, ec.generate_private_key(ec.SECP256R1())))


async def test_the_gateway_trusts_a_real_issuer_by_its_jwks(
    base_settings: Settings,
    settings: Settings,
    jwks: JwksServer,
    db_sessions: async_sessionmaker[AsyncSession],
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    jwks.keys = [key]
    with_issuer = issuer_settings(settings, jwks.url, auth_roles_claim="realm_access.roles")
    token = issued(with_issuer, key)
    payload = claims(with_issuer, iss=ISSUER, realm_access={"roles": "reviewer offline_access"})
    nested = jwt.encode(
        payload, key, algorithm="ES256", headers={"kid": local_issuer.key_id(key.public_key())}
    )

    async with gateway(with_issuer) as client:
        # the roles claim here is realm_access.roles, which this token lacks: valid, but no role
        no_role = await client.get("/orders", headers={"Authorization": f"Bearer {token}"})
        reviewer = await client.get("/stats", headers={"Authorization": f"Bearer {nested}"})
        local = await client.get("/orders", headers=bearer(settings, OPERATOR, Role.OPERATOR))

    assert no_role.status_code == 403
    assert reviewer.status_code == 200, reviewer.text
    assert local.status_code == 401  # the local issuer is trusted only when enabled


def test_roles_come_from_a_list_or_a_space_separated_string() -> None:
    assert role_names({"roles": ["reviewer", "admin", 3]}, "roles") == ["reviewer", "admin"]
    assert role_names({"scp": "customer operator"}, "scp") == ["customer", "operator"]
    assert role_names({"realm_access": {"roles": ["operator"]}}, "realm_access.roles") == ["operator"]
    assert role_names({"realm_access": ["operator"]}, "realm_access.roles") == []
    assert role_names({}, "roles") == []


# --- no start without auth ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({}, "no token issuer is configured"),
        ({"auth_issuer": ISSUER}, "go together"),
        ({"auth_issuer": ISSUER, "auth_jwks_url": "http://issuer.test/jwks"}, "https://"),
        (
            {"auth_local_issuer": True, "auth_local_issuer_key_file": Path("/nonexistent/key.pem")},
            "does not exist",
        ),
        ({"auth_local_issuer": True, "auth_algorithms": ["ES256", "HS256"]}, "HS256"),
        ({"auth_local_issuer": True, "auth_algorithms": ["none"]}, "none"),
    ],
)
def test_the_gateway_refuses_to_start_without_a_trustworthy_issuer(
    base_settings: Settings, changes: dict[str, Any], reason: str
) -> None:
    settings = base_settings.model_copy(update={"auth_local_issuer": False, **changes})
    with pytest.raises(AuthNotConfigured, match=reason):
        TokenVerifier.from_settings(settings)


def test_python_m_services_api_exits_with_one_line_when_no_issuer_is_configured(
    base_settings: Settings,
) -> None:
    env = service_environment(base_settings.model_copy(update={"auth_local_issuer": False}))

    run = subprocess.run(
        [sys.executable, "-m", "services.api"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    output = (run.stdout + run.stderr).strip()
    assert run.returncode == 2
    assert "no token issuer is configured" in output
    assert "Traceback" not in output
    assert len(output.splitlines()) == 1
