"""Secured connections: the gateway over HTTPS for real, and TLS settings reaching every AMQP and
PostgreSQL connection (this machine's servers have no TLS listener: a connection that insists on
TLS fails against them, which shows the settings arrived)."""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy.engine import make_url

from devstack.stack import service_environment
from services.api.__main__ import serving_options
from shared import broker, db, schema
from shared.connection_security import amqp_ssl_context, amqp_url, database_url, postgres_ssl
from shared.settings import Settings
from testsupport.gateway import closed_port

START_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class Certificates:
    ca: Path
    cert: Path
    key: Path


def write_certificates(directory: Path) -> Certificates:
    """A CA, and a certificate it signed for 127.0.0.1 and localhost, with its key."""
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "orderflow test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    written = Certificates(ca=directory / "ca.pem", cert=directory / "cert.pem", key=directory / "key.pem")
    written.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    written.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    written.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return written


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return write_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def https_gateway(
    settings: Settings, migrated_database: str, certificates: Certificates, tmp_path: Path
) -> Iterator[str]:
    """`python -m services.api` serving HTTPS with the test certificate (its servers answering: it
    waits for them before it serves)."""
    port = closed_port()
    secured = settings.model_copy(
        update={"api_tls_cert_file": certificates.cert, "api_tls_key_file": certificates.key}
    )
    env = service_environment(secured) | {"ORDERFLOW_API_HOST": "127.0.0.1", "ORDERFLOW_API_PORT": str(port)}
    log_path = tmp_path / "gateway.log"
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "services.api"], env=env, stdout=log, stderr=log)
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not serves(url, certificates.ca):
            assert process.poll() is None, f"the gateway exited:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"no answer over HTTPS:\n{log_path.read_text()}"
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def serves(url: str, ca: Path) -> bool:
    try:
        return httpx.get(f"{url}/healthz", verify=ssl.create_default_context(cafile=ca)).is_success
    except httpx.TransportError:
        return False


def test_the_gateway_serves_https_with_the_given_certificate(
    https_gateway: str, certificates: Certificates
) -> None:
    trusting = ssl.create_default_context(cafile=certificates.ca)
    assert httpx.get(f"{https_gateway}/healthz", verify=trusting).status_code == httpx.codes.OK
    # a client that does not know the CA refuses it, and plain HTTP gets no answer
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{https_gateway}/healthz")
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{https_gateway.replace('https', 'http')}/healthz")


def test_forwarded_headers_are_believed_only_from_the_configured_proxies() -> None:
    assert serving_options(Settings(_env_file=None)) == {
        "ssl_certfile": None,
        "ssl_keyfile": None,
        "proxy_headers": False,
        "forwarded_allow_ips": None,
    }
    behind_proxy = serving_options(Settings(_env_file=None, api_forwarded_allow_ips="10.0.0.5, 10.1.0.0/16"))
    assert behind_proxy["proxy_headers"] is True
    assert behind_proxy["forwarded_allow_ips"] == ["10.0.0.5", "10.1.0.0/16"]


def test_passwords_come_from_files(tmp_path: Path) -> None:
    broker_password, database_password = tmp_path / "broker", tmp_path / "database"
    broker_password.write_text("s3cret/+@\n")
    database_password.write_text("an0ther:@\n")
    settings = Settings(
        _env_file=None,
        amqp_url="amqp://gateway@rabbit:5672/",
        amqp_password_file=broker_password,
        database_url="postgresql+asyncpg://app@db:5432/orderflow",
        database_password_file=database_password,
    )
    assert "s3cret" not in settings.amqp_url
    assert httpx.URL(amqp_url(settings)).password == "s3cret/+@"
    assert make_url(database_url(settings)).password == "an0ther:@"


def test_amqps_checks_the_broker_and_presents_the_client_certificate(certificates: Certificates) -> None:
    assert amqp_ssl_context(Settings(_env_file=None)) is None
    context = amqp_ssl_context(
        Settings(
            _env_file=None,
            amqp_url="amqps://guest:guest@127.0.0.1:5671/",
            amqp_ca_file=certificates.ca,
            amqp_cert_file=certificates.cert,
            amqp_key_file=certificates.key,
        )
    )
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert [cert["subject"] for cert in context.get_ca_certs()] == [((("commonName", "orderflow test CA"),),)]


@pytest.mark.parametrize(
    ("sslmode", "with_root", "verify_mode", "check_hostname"),
    [
        ("require", False, ssl.CERT_NONE, False),
        ("require", True, ssl.CERT_REQUIRED, False),
        ("verify-ca", True, ssl.CERT_REQUIRED, False),
        ("verify-full", True, ssl.CERT_REQUIRED, True),
    ],
)
def test_postgres_sslmodes_mean_what_they_mean_to_libpq(
    certificates: Certificates,
    sslmode: Literal["require", "verify-ca", "verify-full"],
    with_root: bool,
    verify_mode: ssl.VerifyMode,
    check_hostname: bool,
) -> None:
    settings = Settings(
        _env_file=None,
        database_sslmode=sslmode,
        database_sslrootcert=certificates.ca if with_root else None,
        database_sslcert=certificates.cert,
        database_sslkey=certificates.key,
    )
    context = postgres_ssl(settings)
    assert isinstance(context, ssl.SSLContext)
    assert (context.verify_mode, context.check_hostname) == (verify_mode, check_hostname)
    assert postgres_ssl(Settings(_env_file=None)) == "prefer"


async def test_every_database_connection_insists_on_tls_when_told(base_settings: Settings) -> None:
    insisting = base_settings.model_copy(update={"database_sslmode": "require"})
    url, tls = database_url(insisting), postgres_ssl(insisting)
    engine = db.create_engine(insisting)
    try:
        with pytest.raises(ConnectionError, match="SSL"):
            async with engine.connect():
                pass
    finally:
        await engine.dispose()
    with pytest.raises(ConnectionError, match="SSL"):
        await schema.ensure_database(url, tls)
    with pytest.raises(ConnectionError, match="SSL"):
        await asyncio.to_thread(schema.upgrade, url, tls)
    # the LISTEN connections of the gateway's streams and the bridge's slot gate
    with pytest.raises(ConnectionError, match="SSL"):
        await db.listening_connection(insisting)


async def test_every_broker_connection_speaks_tls_to_an_amqps_url(base_settings: Settings) -> None:
    # the broker's plain AMQP port, asked for TLS: the handshake fails
    insisting = base_settings.model_copy(
        update={"amqp_url": base_settings.amqp_url.replace("amqp://", "amqps://")}
    )
    with pytest.raises(ConnectionError):
        await broker.connect(insisting, "tests-tls", patience=0)
