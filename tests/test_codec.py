"""Payload encryption (`shared.codec`), its keys, the codec server on the gateway, and how services
reach Temporal (`shared.temporal`: Temporal's environment configuration)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from http.cookies import Morsel, SimpleCookie
from pathlib import Path

import httpx
import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric import ec
from playwright.async_api import Page, async_playwright, expect
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.api.common.v1 import Payload
from temporalio.api.failure.v1 import Failure
from temporalio.exceptions import ApplicationError
from temporalio.service import TLSConfig

from services.api.codec import PREFIX, SESSION_COOKIE
from shared import local_issuer
from shared.codec import (
    ENCODING,
    KEY_ID_METADATA,
    EncryptionCodec,
    PayloadKeyring,
    PayloadKeysError,
    UndecryptablePayload,
    encrypted_data_converter,
    parse_key_entries,
    payload_keyring,
)
from shared.contracts import Role
from shared.settings import Settings
from shared.temporal import connect_config, connect_temporal
from testsupport.gateway import bearer, gateway, gateway_process, serving_page
from testsupport.orders import unique_id
from testsupport.polling import eventually

SECRET = "Ada Lovelace, 12 St James's Square"
UI_ORIGIN = "http://127.0.0.1:8233"


def key_entry(key_id: str, fill: int) -> str:
    return f"{key_id}:{base64.b64encode(bytes([fill]) * 32).decode()}"


def codec(*entries: str) -> EncryptionCodec:
    return EncryptionCodec(parse_key_entries(("test", entry) for entry in entries))


def plain(text: str = SECRET) -> Payload:
    return Payload(metadata={"encoding": b"json/plain"}, data=f'"{text}"'.encode())


# --- the codec ------------------------------------------------------------------------------------
async def test_a_payload_is_encrypted_under_the_current_key_and_decrypts_to_itself() -> None:
    keys = codec(key_entry("k1", 1))

    [sealed] = await keys.encode([plain()])

    assert sealed.metadata["encoding"] == ENCODING
    assert sealed.metadata[KEY_ID_METADATA] == b"k1"
    assert b"json/plain" not in sealed.data and SECRET.encode() not in sealed.data
    assert await keys.decode([sealed]) == [plain()]
    # a fresh nonce each time: equal payloads do not look equal
    assert (await keys.encode([plain()]))[0].data != sealed.data


async def test_after_a_rotation_the_old_key_still_decrypts_and_the_new_one_encrypts() -> None:
    [before] = await codec(key_entry("k1", 1)).encode([plain()])
    rotated = codec(key_entry("k2", 2), key_entry("k1", 1))

    [after] = await rotated.encode([plain()])

    assert await rotated.decode([before, after]) == [plain(), plain()]
    assert after.metadata[KEY_ID_METADATA] == b"k2"
    with pytest.raises(UndecryptablePayload, match="'k1', which is not in the keyring"):
        await codec(key_entry("k2", 2)).decode([before])


async def test_an_altered_payload_does_not_decrypt() -> None:
    keys = codec(key_entry("k2", 2), key_entry("k1", 1))
    [sealed] = await keys.encode([plain()])
    flipped = Payload(metadata=sealed.metadata, data=sealed.data[:-1] + bytes([sealed.data[-1] ^ 1]))
    relabelled = Payload(metadata={**sealed.metadata, KEY_ID_METADATA: b"k1"}, data=sealed.data)
    truncated = Payload(metadata=sealed.metadata, data=sealed.data[:5])

    for altered in (flipped, relabelled, truncated):
        with pytest.raises(UndecryptablePayload, match="altered or is corrupt"):
            await keys.decode([altered])


async def test_a_payload_from_before_encryption_passes_through() -> None:
    assert await codec(key_entry("k1", 1)).decode([plain()]) == [plain()]


async def test_failure_messages_and_stack_traces_travel_encrypted() -> None:
    converter = encrypted_data_converter(parse_key_entries(iter([("t", key_entry("k1", 1))])))
    failure = Failure()
    try:
        raise ApplicationError(f"cannot ship to {SECRET}")
    except ApplicationError as error:
        await converter.encode_failure(error, failure)

    assert SECRET not in str(failure)
    assert failure.encoded_attributes.metadata["encoding"] == ENCODING
    decoded = await converter.decode_failure(failure)
    assert str(decoded) == f"cannot ship to {SECRET}"


# --- the keys -------------------------------------------------------------------------------------
def keys_from_environment(monkeypatch: pytest.MonkeyPatch, **variables: str) -> PayloadKeyring:
    for name in ("ORDERFLOW_PAYLOAD_KEYS", "ORDERFLOW_PAYLOAD_KEYS_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(f"ORDERFLOW_{name.upper()}", value)
    return payload_keyring(Settings(_env_file=None))


def test_keys_come_from_the_variable_then_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# rotated in May\n{key_entry('k2', 2)}\n\n{key_entry('k1', 1)}\n")

    assert list(keys_from_environment(monkeypatch, payload_keys_file=str(keys_file))) == ["k2", "k1"]
    both = keys_from_environment(
        monkeypatch, payload_keys=key_entry("k3", 3), payload_keys_file=str(keys_file)
    )
    assert list(both) == ["k3", "k2", "k1"]  # the first encrypts


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({}, "no payload encryption key: set ORDERFLOW_PAYLOAD_KEYS or ORDERFLOW_PAYLOAD_KEYS_FILE"),
        ({"payload_keys_file": ""}, "no payload encryption key"),
        (
            {"payload_keys": f"{key_entry('k1', 1)},no id:{key_entry('k2', 2)}"},
            "ORDERFLOW_PAYLOAD_KEYS: entry 2: expected `id:base64",
        ),
        ({"payload_keys": "k1:" + base64.b64encode(b"s3cret-but-short").decode()}, "'k1' is not 32 bytes"),
        ({"payload_keys": "k1:not base64!"}, "'k1' is not 32 bytes in base64"),
        (
            {"payload_keys": f"{key_entry('k1', 1)},{key_entry('k1', 2)}"},
            "entry 2: key id 'k1' appears twice",
        ),
        (
            {"payload_keys_file": "/nonexistent/keys"},
            "ORDERFLOW_PAYLOAD_KEYS_FILE: cannot read /nonexistent/keys",
        ),
    ],
)
def test_bad_keys_are_named_without_their_value(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], message: str
) -> None:
    with pytest.raises(PayloadKeysError, match=message) as refused:
        keys_from_environment(monkeypatch, **variables)
    secret = variables.get("payload_keys", "").rpartition(":")[2]
    assert not secret or secret not in str(refused.value)


def test_a_service_without_a_key_does_not_start(tmp_path: Path) -> None:
    env = {name: value for name, value in os.environ.items() if not name.startswith("ORDERFLOW_PAYLOAD_KEYS")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])

    # the working directory has no .env; the service stops before it connects to anything
    ran = subprocess.run(
        [sys.executable, "-m", "services.workers"],
        check=False,
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert ran.returncode == 2
    [line] = ran.stdout.splitlines() + ran.stderr.splitlines()
    assert "no payload encryption key: set ORDERFLOW_PAYLOAD_KEYS" in line


# --- the codec server -----------------------------------------------------------------------------
@pytest_asyncio.fixture
async def codec_server(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with gateway(settings) as client:
        yield client


def as_json(payload: Payload) -> dict[str, object]:
    return {
        "metadata": {name: base64.b64encode(value).decode() for name, value in payload.metadata.items()},
        "data": base64.b64encode(payload.data).decode(),
    }


def from_json(payload: dict[str, dict[str, str] | str]) -> Payload:
    metadata = payload.get("metadata", {})
    data = payload.get("data", "")
    assert isinstance(metadata, dict) and isinstance(data, str)
    return Payload(
        metadata={name: base64.b64decode(value) for name, value in metadata.items()},
        data=base64.b64decode(data),
    )


async def test_an_operator_encodes_and_decodes_through_the_codec_server(
    codec_server: httpx.AsyncClient, settings: Settings
) -> None:
    operator = bearer(settings, "olga", Role.OPERATOR) | {"X-Namespace": settings.temporal_namespace}

    encoded = await codec_server.post(
        f"{PREFIX}/encode", json={"payloads": [as_json(plain())]}, headers=operator
    )
    assert encoded.status_code == httpx.codes.OK, encoded.text
    [sealed] = encoded.json()["payloads"]
    assert from_json(sealed).metadata["encoding"] == ENCODING
    # what the services wrote, the codec server reads: one keyring
    assert await EncryptionCodec(payload_keyring(settings)).decode([from_json(sealed)]) == [plain()]

    decoded = await codec_server.post(f"{PREFIX}/decode", json={"payloads": [sealed]}, headers=operator)
    assert decoded.status_code == httpx.codes.OK, decoded.text
    assert [from_json(payload) for payload in decoded.json()["payloads"]] == [plain()]


async def test_only_operators_use_the_codec_server(
    codec_server: httpx.AsyncClient, settings: Settings
) -> None:
    [sealed] = await EncryptionCodec(payload_keyring(settings)).encode([plain()])
    body = {"payloads": [as_json(sealed)]}
    callers = {
        "anonymous": ({}, httpx.codes.UNAUTHORIZED),
        "customer": (bearer(settings, "cora", Role.CUSTOMER), httpx.codes.FORBIDDEN),
        "reviewer": (bearer(settings, "rita", Role.REVIEWER), httpx.codes.FORBIDDEN),
    }
    for caller, (headers, refused) in callers.items():
        for operation in ("decode", "encode"):
            answer = await codec_server.post(f"{PREFIX}/{operation}", json=body, headers=headers)
            assert answer.status_code == refused, (caller, operation, answer.text)
            assert SECRET not in answer.text


async def test_an_undecryptable_payload_is_refused_by_name(
    codec_server: httpx.AsyncClient, settings: Settings
) -> None:
    [foreign] = await codec(key_entry("elsewhere", 9)).encode([plain()])

    answer = await codec_server.post(
        f"{PREFIX}/decode",
        json={"payloads": [as_json(foreign)]},
        headers=bearer(settings, "olga", Role.OPERATOR),
    )

    assert answer.status_code == httpx.codes.BAD_REQUEST
    assert "'elsewhere', which is not in the keyring" in answer.json()["detail"]


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"payloads": "none"}, ["body", "payloads"]),
        ({"payloads": [{"data": "not base64!"}]}, ["body", "payloads", 0, "data"]),
        ({"payloads": [{"metadata": {"encoding": "QQ="}}]}, ["body", "payloads", 0, "metadata", "encoding"]),
    ],
)
async def test_a_body_that_is_not_payloads_json_is_a_validation_error(
    codec_server: httpx.AsyncClient, settings: Settings, body: dict[str, object], where: list[object]
) -> None:
    answer = await codec_server.post(
        f"{PREFIX}/decode", json=body, headers=bearer(settings, "olga", Role.OPERATOR)
    )

    assert answer.status_code == httpx.codes.UNPROCESSABLE_ENTITY
    assert [error["loc"] for error in answer.json()["detail"]] == [where]


async def test_base64_comes_standard_or_url_safe_padded_or_not(
    codec_server: httpx.AsyncClient, settings: Settings
) -> None:
    spellings = ["+/+/", "-_-_", "QUI=", "QUI", "QQ==", "QQ", ""]
    body = {"payloads": [{"metadata": {"encoding": "anNvbi9wbGFpbg"}, "data": data} for data in spellings]}

    answer = await codec_server.post(
        f"{PREFIX}/decode", json=body, headers=bearer(settings, "olga", Role.OPERATOR)
    )

    assert answer.status_code == httpx.codes.OK, answer.text
    assert [from_json(payload).data for payload in answer.json()["payloads"]] == [
        b"\xfb\xff\xbf",
        b"\xfb\xff\xbf",
        b"AB",
        b"AB",
        b"A",
        b"A",
        b"",
    ]


@pytest.mark.parametrize("operation", ["decode", "encode"])
async def test_no_payloads_come_back_as_no_payloads(
    codec_server: httpx.AsyncClient, settings: Settings, operation: str
) -> None:
    answer = await codec_server.post(
        f"{PREFIX}/{operation}", json={"payloads": []}, headers=bearer(settings, "olga", Role.OPERATOR)
    )

    assert answer.status_code == httpx.codes.OK, answer.text
    assert answer.json() == {"payloads": []}


async def test_the_temporal_ui_origin_may_call_the_codec_server_and_no_other(
    codec_server: httpx.AsyncClient,
) -> None:
    def preflight(origin: str, path: str = f"{PREFIX}/decode") -> dict[str, str]:
        return {
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type,x-namespace",
        }

    allowed = await codec_server.options(f"{PREFIX}/decode", headers=preflight(UI_ORIGIN))
    assert allowed.status_code == httpx.codes.OK
    assert allowed.headers["access-control-allow-origin"] == UI_ORIGIN
    assert allowed.headers["access-control-allow-credentials"] == "true"
    assert {"authorization", "content-type", "x-namespace"} <= {
        header.strip().lower() for header in allowed.headers["access-control-allow-headers"].split(",")
    }

    elsewhere = await codec_server.options(f"{PREFIX}/decode", headers=preflight("https://evil.example"))
    assert elsewhere.status_code == httpx.codes.BAD_REQUEST
    assert "access-control-allow-origin" not in elsewhere.headers
    # the UI's answers carry CORS headers, so it reads a refusal too (here: no token)
    refused = await codec_server.post(
        f"{PREFIX}/decode", json={"payloads": []}, headers={"Origin": UI_ORIGIN}
    )
    assert refused.status_code == httpx.codes.UNAUTHORIZED
    assert refused.headers["access-control-allow-origin"] == UI_ORIGIN
    # the rest of the gateway answers no cross-origin request
    orders = await codec_server.options("/orders", headers=preflight(UI_ORIGIN))
    assert "access-control-allow-origin" not in orders.headers


# --- the codec session cookie (the Temporal UI under `make run`) ----------------------------------
SESSION_LIFETIME_SECONDS = 600


def token_of(settings: Settings, subject: str, role: Role, lifetime: int, now: float | None = None) -> str:
    return local_issuer.mint_token(settings, subject, [role], lifetime_seconds=lifetime, now=now)


def session_cookie_of(response: httpx.Response) -> Morsel[str]:
    [set_cookie] = response.headers.get_list("set-cookie")
    cookie: SimpleCookie = SimpleCookie()
    cookie.load(set_cookie)
    return cookie[SESSION_COOKIE]


def only_the_cookie(token: str) -> dict[str, str]:
    return {"Cookie": f"{SESSION_COOKIE}={token}"}


async def sealed_body(settings: Settings) -> dict[str, object]:
    [sealed] = await EncryptionCodec(payload_keyring(settings)).encode([plain()])
    return {"payloads": [as_json(sealed)]}


async def test_only_an_operator_opens_a_codec_session_a_cookie_for_codec_alone(
    codec_server: httpx.AsyncClient, settings: Settings
) -> None:
    refused = {
        "anonymous": ({}, httpx.codes.UNAUTHORIZED),
        "customer": (bearer(settings, "cora", Role.CUSTOMER), httpx.codes.FORBIDDEN),
        "reviewer": (bearer(settings, "rita", Role.REVIEWER), httpx.codes.FORBIDDEN),
    }
    for caller, (headers, status) in refused.items():
        answer = await codec_server.post(f"{PREFIX}/session", headers=headers)
        assert answer.status_code == status, (caller, answer.text)
        assert "set-cookie" not in answer.headers, caller

    token = token_of(settings, "olga", Role.OPERATOR, SESSION_LIFETIME_SECONDS)
    opened = await codec_server.post(f"{PREFIX}/session", headers={"Authorization": f"Bearer {token}"})

    assert opened.status_code == httpx.codes.NO_CONTENT, opened.text
    cookie = session_cookie_of(opened)
    assert cookie.value == token
    assert (cookie["path"], cookie["samesite"].lower(), cookie["httponly"]) == (PREFIX, "strict", True)
    assert 0 < int(cookie["max-age"]) <= SESSION_LIFETIME_SECONDS  # no longer than the token lasts
    assert not cookie["secure"]  # plain http: a Secure cookie would not come back


async def test_a_codec_session_over_https_sets_a_secure_cookie(settings: Settings) -> None:
    async with gateway(settings) as client:
        client.base_url = httpx.URL("https://gw")

        opened = await client.post(f"{PREFIX}/session", headers=bearer(settings, "olga", Role.OPERATOR))

    assert opened.status_code == httpx.codes.NO_CONTENT, opened.text
    assert session_cookie_of(opened)["secure"] is True


async def test_the_cookie_alone_decodes_authorizes_nothing_else_and_goes_on_sign_out(
    codec_server: httpx.AsyncClient, settings: Settings
) -> None:
    operator = bearer(settings, "olga", Role.OPERATOR)
    body = await sealed_body(settings)
    opened = await codec_server.post(f"{PREFIX}/session", headers=operator)
    token = session_cookie_of(opened).value

    # what the Temporal UI sends with "Include cross-origin credentials": its origin and the cookie
    decoded = await codec_server.post(f"{PREFIX}/decode", json=body, headers={"Origin": UI_ORIGIN})
    assert decoded.status_code == httpx.codes.OK, decoded.text
    assert [from_json(payload) for payload in decoded.json()["payloads"]] == [plain()]
    assert decoded.headers["access-control-allow-origin"] == UI_ORIGIN
    encoded = await codec_server.post(f"{PREFIX}/encode", json={"payloads": [as_json(plain())]})
    assert encoded.status_code == httpx.codes.OK, encoded.text

    # the same token as a cookie anywhere else is no credential (the browser would not even send it)
    order_id = unique_id("cookie")
    for method, path in [
        ("POST", f"/orders/{order_id}/approve"),
        ("POST", f"/orders/{order_id}/cancel"),
        ("GET", "/orders"),
        ("POST", f"{PREFIX}/session"),
    ]:
        answer = await codec_server.request(method, path, headers=only_the_cookie(token))
        assert answer.status_code == httpx.codes.UNAUTHORIZED, (method, path, answer.text)

    closed = await codec_server.delete(f"{PREFIX}/session", headers=operator)
    assert closed.status_code == httpx.codes.NO_CONTENT
    gone = session_cookie_of(closed)
    assert (gone.value, gone["max-age"], gone["path"]) == ("", "0", PREFIX)
    assert SESSION_COOKIE not in codec_server.cookies
    after = await codec_server.post(f"{PREFIX}/decode", json=body)
    assert after.status_code == httpx.codes.UNAUTHORIZED


async def test_a_cookie_is_verified_as_a_bearer_token_is(
    codec_server: httpx.AsyncClient, settings: Settings
) -> None:
    body = await sealed_body(settings)
    an_hour_ago = time.time() - 3600
    stranger = ec.generate_private_key(ec.SECP256R1())
    trusted = local_issuer.load_private_key(settings.auth_local_issuer_key_file)
    genuine = token_of(settings, "olga", Role.OPERATOR, SESSION_LIFETIME_SECONDS)
    genuine_claims = jwt.decode(genuine, options={"verify_signature": False})
    cookies = {
        "expired": (token_of(settings, "olga", Role.OPERATOR, 60, now=an_hour_ago), httpx.codes.UNAUTHORIZED),
        "forged": (
            jwt.encode(
                genuine_claims,
                stranger,
                algorithm="ES256",
                headers={"kid": local_issuer.key_id(trusted.public_key())},
            ),
            httpx.codes.UNAUTHORIZED,
        ),
        "not a token": ("not-a-token", httpx.codes.UNAUTHORIZED),
        "a reviewer's": (token_of(settings, "rita", Role.REVIEWER, 600), httpx.codes.FORBIDDEN),
    }
    for kind, (token, status) in cookies.items():
        answer = await codec_server.post(f"{PREFIX}/decode", json=body, headers=only_the_cookie(token))
        assert answer.status_code == status, (kind, answer.text)
        assert token not in answer.text and SECRET not in answer.text


@contextmanager
def temporal_ui_stand_in() -> Iterator[int]:
    """An empty page on a port of this host, standing in for the Temporal UI's origin; its port."""
    with serving_page(b"<!doctype html><title>Temporal UI stand-in</title>") as port:
        yield port


# what the Temporal UI's fetch does with "Include cross-origin credentials" (its data-encoder.ts)
UI_DECODE = """async ([endpoint, body]) => {
  const answer = await fetch(`${endpoint}/decode`, {
    method: "POST",
    credentials: "include",
    headers: { "Content-Type": "application/json", "X-Namespace": "default" },
    body: JSON.stringify(body),
  });
  return [answer.status, await answer.text()];
}"""


async def decode_from(page: Page, origin: str, endpoint: str, body: dict[str, object]) -> tuple[int, str]:
    await page.goto(f"{origin}/")
    status, text = await page.evaluate(UI_DECODE, [endpoint, body])
    return int(status), str(text)


@pytest.mark.e2e
async def test_the_temporal_ui_of_the_same_host_decodes_once_an_operator_signed_in_to_the_dashboard(
    settings: Settings, db_sessions: async_sessionmaker[AsyncSession], tmp_path: Path, chromium: str
) -> None:
    body = await sealed_body(settings)
    operator = token_of(settings, "oona", Role.OPERATOR, SESSION_LIFETIME_SECONDS)
    with temporal_ui_stand_in() as ui_port:
        same_site, other_site = f"http://127.0.0.1:{ui_port}", f"http://localhost:{ui_port}"
        served = settings.model_copy(update={"codec_cors_origins": [same_site, other_site]})
        with gateway_process(served, tmp_path / "gateway.log") as url:
            async with async_playwright() as playwright:
                browser = await playwright.chromium.launch(executable_path=chromium)
                context = await browser.new_context()
                dashboard = await context.new_page()
                await dashboard.goto(f"{url}/dashboard#token={operator}")
                await expect(dashboard.locator("#who")).to_have_text("oona · operator")

                async def cookie_set() -> bool:
                    return any(cookie["name"] == SESSION_COOKIE for cookie in await context.cookies())

                await eventually(cookie_set, 10)
                ui = await context.new_page()
                status, decoded = await decode_from(ui, same_site, f"{url}/codec", body)
                assert status == httpx.codes.OK, decoded
                assert [from_json(payload) for payload in json.loads(decoded)["payloads"]] == [plain()]
                # `localhost` is another site than `127.0.0.1`: a SameSite=Strict cookie stays home
                status, refused = await decode_from(ui, other_site, f"{url}/codec", body)
                assert status == httpx.codes.UNAUTHORIZED, refused

                await dashboard.click("#sign-out")

                async def cookie_gone() -> bool:
                    return not await cookie_set()

                await eventually(cookie_gone, 10)
                status, refused = await decode_from(ui, same_site, f"{url}/codec", body)
                assert status == httpx.codes.UNAUTHORIZED, refused
                await browser.close()


# --- the connection to Temporal ----------------------------------------------------------------
def test_orderflow_settings_are_the_default_connection() -> None:
    settings = Settings(
        _env_file=None, temporal_address="temporal.internal:7233", temporal_namespace="orders"
    )

    assert connect_config(settings, environ={}) == {
        "target_host": "temporal.internal:7233",
        "namespace": "orders",
    }


def test_temporal_variables_configure_cloud_with_an_api_key() -> None:
    environ = {
        "TEMPORAL_ADDRESS": "orders.a1b2c.tmprl.cloud:7233",
        "TEMPORAL_NAMESPACE": "orders.a1b2c",
        "TEMPORAL_API_KEY": "the-api-key",
    }

    config = connect_config(Settings(_env_file=None), environ)

    assert config == {
        "target_host": "orders.a1b2c.tmprl.cloud:7233",
        "namespace": "orders.a1b2c",
        "api_key": "the-api-key",
        "tls": True,  # an API key implies TLS
    }


def test_temporal_variables_configure_mutual_tls(tmp_path: Path) -> None:
    for name in ("ca.pem", "client.pem", "client.key"):
        (tmp_path / name).write_bytes(f"contents of {name}".encode())
    environ = {
        "TEMPORAL_ADDRESS": "temporal.internal:7233",
        "TEMPORAL_TLS_SERVER_CA_CERT_PATH": str(tmp_path / "ca.pem"),
        "TEMPORAL_TLS_CLIENT_CERT_PATH": str(tmp_path / "client.pem"),
        "TEMPORAL_TLS_CLIENT_KEY_PATH": str(tmp_path / "client.key"),
        "TEMPORAL_TLS_SERVER_NAME": "temporal",
    }

    tls = connect_config(Settings(_env_file=None), environ)["tls"]

    assert tls == TLSConfig(
        server_root_ca_cert=b"contents of ca.pem",
        client_cert=b"contents of client.pem",
        client_private_key=b"contents of client.key",
        domain="temporal",
    )


def test_a_profile_of_temporals_config_file_is_used(tmp_path: Path) -> None:
    profiles = tmp_path / "temporal.toml"
    profiles.write_text(
        '[profile.cloud]\naddress = "orders.a1b2c.tmprl.cloud:7233"\nnamespace = "orders.a1b2c"\n'
        'api_key = "from-the-file"\n'
    )
    environ = {"TEMPORAL_CONFIG_FILE": str(profiles), "TEMPORAL_PROFILE": "cloud"}

    config = connect_config(Settings(_env_file=None, temporal_namespace="ignored"), environ)

    assert (config["target_host"], config["namespace"], config.get("api_key")) == (
        "orders.a1b2c.tmprl.cloud:7233",
        "orders.a1b2c",
        "from-the-file",
    )


async def test_tls_from_temporals_variables_reaches_the_connection(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the tests' dev server speaks plaintext: the same address refuses a client that insists on TLS
    client = await connect_temporal(settings, patience=0)
    assert client.namespace == settings.temporal_namespace

    monkeypatch.setenv("TEMPORAL_TLS", "true")
    with pytest.raises(RuntimeError):
        await connect_temporal(settings, patience=0)
