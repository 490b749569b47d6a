"""All configuration, read once from the environment (prefix `ORDERFLOW_`) or a `.env` file; the
defaults are safe for a developer machine. `.env.example` documents every setting."""

from __future__ import annotations

from ipaddress import ip_network
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from limits import parse_many
from pydantic import (
    BeforeValidator,
    Field,
    FilePath,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from shared.contracts import Role
from shared.lifecycle import LifecyclePolicy

ENV_PREFIX = "ORDERFLOW_"
# each URL setting's schemes: a typo is then a bad setting at start-up, not a failed connection later
URL_SCHEMES = {
    "amqp_url": ("amqp", "amqps"),
    "api_url": ("http", "https"),
    "temporal_ui_url": ("http", "https"),
}
# each private key setting and the certificate setting it belongs with
CERTIFICATE_OF_KEY = {
    "amqp_key_file": "amqp_cert_file",
    "database_sslkey": "database_sslcert",
    "api_tls_key_file": "api_tls_cert_file",
}
VERIFYING_SSLMODES = ("require", "verify-ca", "verify-full")


def _empty_is(unset: object) -> BeforeValidator:
    """An empty value, as an unset variable in a compose file reads, taken as `unset`."""
    return BeforeValidator(lambda value: unset if value == "" else value)


OptionalPath = Annotated[Path | None, _empty_is(None)]
OptionalFile = Annotated[FilePath | None, _empty_is(None)]
"""An existing file; empty means none."""
KeyFile = Annotated[OptionalFile, Field(validate_default=True)]
"""A private key file, checked even when unset: it goes with its certificate (`CERTIFICATE_OF_KEY`)."""
Port = Annotated[int, _empty_is(0), Field(ge=0, le=65535)]
"""A port to listen on; 0 or empty: none."""

# under the 10 s a platform (Docker, Kubernetes) waits between SIGTERM and SIGKILL by default
DRAIN_SECONDS = 8


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=".env", extra="ignore")

    # connections
    database_url: str = "postgresql+asyncpg://postgres@127.0.0.1:5432/orderflow"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    temporal_address: str = "127.0.0.1:7233"
    temporal_namespace: str = "default"
    temporal_ui_url: str = "http://127.0.0.1:8233"

    # task queues
    order_task_queue: str = "order-tq"
    shipping_task_queue: str = "shipping-tq"

    # broker queues owned by orderflow (the exchanges are the public contract and fixed)
    command_queue: str = "orders.commands.bridge"
    placement_queue: str = "orders.commands.place"
    audit_queue: str = "orders.events.audit"
    command_prefetch: int = Field(default=64, ge=1)
    max_command_deliveries: int = Field(default=5, ge=1)
    placement_prefetch: int = Field(default=100, ge=1)
    audit_prefetch: int = Field(default=64, ge=1)
    audit_batch_linger_ms: int = Field(default=20, ge=0, le=1000)
    max_event_deliveries: int = Field(default=5, ge=1)

    # admission and shedding: RabbitMQ holds the placements the running lifecycles leave waiting;
    # 12 at once is what this machine kind sustains best (docs/performance.md)
    max_running_lifecycles: int = Field(default=12, ge=1)
    placement_backlog_limit: int = Field(default=2000, ge=1)
    shed_retry_after_seconds: int = Field(default=5, ge=1)

    workflow_sandbox: bool = False

    # how many of each service `make run` starts
    bridge_instances: int = Field(default=1, ge=1)
    worker_instances: int = Field(default=1, ge=1)

    # lifecycle timing: every lifecycle's own work ends within 15 s of its start
    review_window_seconds: float = Field(default=300.0, gt=0)
    review_slot_grace_seconds: float = Field(default=1.0, ge=0)
    lifecycle_deadline_seconds: float = Field(default=14.0, gt=0)
    max_shipping_attempts: int = Field(default=3, ge=1)
    activity_attempt_timeout_seconds: float = Field(default=0.3, gt=0)
    parallel_attempts: int = Field(default=3, ge=1, le=5)
    dispatch_attempts_per_shipment: int = Field(default=12, ge=1)

    # HTTP gateway
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_url: str = "http://127.0.0.1:8000"

    # starting and stopping
    startup_patience_seconds: float = Field(default=60.0, ge=0)
    drain_seconds: int = Field(default=DRAIN_SECONDS, ge=1)

    log_level: str = "INFO"
    log_json: bool = True

    # metrics and probes (the gateway serves them on its own port)
    metrics_host: str = "127.0.0.1"
    bridge_metrics_port: Port = 9110
    worker_metrics_port: Port = 9120
    audit_metrics_port: Port = 9130

    # security (docs/security.md): identity at the gateway
    auth_issuer: str = ""
    auth_jwks_url: str = ""
    auth_audience: str = "orderflow"
    auth_algorithms: list[str] = ["RS256", "ES256", "PS256", "EdDSA"]
    auth_roles_claim: str = "roles"
    auth_clock_skew_seconds: int = Field(default=30, ge=0, le=600)
    auth_jwks_cache_seconds: int = Field(default=300, ge=1)
    auth_local_issuer: bool = False
    auth_local_issuer_key_file: Path = Path(".run/local-issuer.pem")
    auth_local_token_lifetime_seconds: int = Field(default=8 * 3600, ge=60)

    # security: AMQP publishers' roles
    amqp_publisher_roles: dict[str, list[Role]] = {}
    amqp_delegates: list[str] = []

    # security: broker users and TLS for AMQP and PostgreSQL; secrets come from files (Docker or
    # Kubernetes secrets) so that no URL or environment holds them
    amqp_password_file: OptionalFile = None
    amqp_ca_file: OptionalFile = None
    amqp_cert_file: OptionalFile = None
    amqp_key_file: KeyFile = None
    database_password_file: OptionalFile = None
    database_sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] = "prefer"
    database_sslrootcert: OptionalFile = None
    database_sslcert: OptionalFile = None
    database_sslkey: KeyFile = None
    api_tls_cert_file: OptionalFile = None
    api_tls_key_file: KeyFile = None
    api_forwarded_allow_ips: str = ""

    # security: payload encryption (Temporal's own TEMPORAL_* variables and profiles configure its
    # connection, and their address and namespace win over temporal_address/_namespace)
    payload_keys: SecretStr = SecretStr("")
    payload_keys_file: OptionalPath = None
    codec_cors_origins: list[str] = ["http://127.0.0.1:8233", "http://localhost:8233"]

    # security: abuse limits at the gateway
    api_max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    api_write_rate_limit: str = "20/second;1000/minute"
    api_max_streams_per_caller: int = Field(default=4, ge=1)

    @field_validator("amqp_key_file", "database_sslkey", "api_tls_key_file")
    @classmethod
    def _key_beside_certificate(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        certificate = CERTIFICATE_OF_KEY[info.field_name or ""]
        if (value is None) != (info.data.get(certificate) is None):
            other = f"{ENV_PREFIX}{certificate.upper()}"
            raise PydanticCustomError("tls", f"should be set together with {other}")
        return value

    @field_validator("amqp_ca_file", "amqp_cert_file")
    @classmethod
    def _amqp_tls_needs_amqps(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None and urlsplit(info.data.get("amqp_url", "amqps:")).scheme != "amqps":
            raise PydanticCustomError("tls", f"needs an amqps:// {ENV_PREFIX}AMQP_URL")
        return value

    @field_validator("database_sslrootcert", "database_sslcert")
    @classmethod
    def _database_tls_needs_sslmode(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None and info.data.get("database_sslmode") not in VERIFYING_SSLMODES:
            raise PydanticCustomError(
                "tls", f"needs {ENV_PREFIX}DATABASE_SSLMODE require, verify-ca or verify-full"
            )
        return value

    @field_validator("api_forwarded_allow_ips")
    @classmethod
    def _proxy_addresses(cls, value: str) -> str:
        try:
            for address in filter(None, (part.strip() for part in value.split(","))):
                if address != "*":
                    ip_network(address, strict=False)
        except ValueError:
            raise PydanticCustomError("proxies", "should be IP addresses or networks, with commas") from None
        return value

    @field_validator("api_write_rate_limit")
    @classmethod
    def _rate_limits(cls, value: str) -> str:
        try:
            parse_many(value)
        except ValueError:
            raise PydanticCustomError("rate", "should be limits like 20/second;1000/minute") from None
        return value

    @field_validator(*URL_SCHEMES)
    @classmethod
    def _url_with_host(cls, value: str, info: ValidationInfo) -> str:
        schemes = URL_SCHEMES[info.field_name or ""]
        try:
            url = urlsplit(value)
            usable = url.scheme in schemes and bool(url.hostname)
        except ValueError:  # an unclosed [ of an IPv6 address, say
            usable = False
        if not usable:  # the value is not repeated: it may hold a password
            kinds = " or ".join(f"{scheme}://" for scheme in schemes)
            raise PydanticCustomError("url", f"should be a URL like {schemes[0]}://host:port/ ({kinds})")
        return value

    @field_validator("database_url")
    @classmethod
    def _postgresql_url(cls, value: str) -> str:
        try:
            backend = make_url(value).get_backend_name()
        except ArgumentError:
            backend = None
        if backend != "postgresql":
            example = "postgresql+asyncpg://user@host:port/database"
            raise PydanticCustomError("url", f"should be a PostgreSQL URL like {example}")
        return value

    def lifecycle_policy(self) -> LifecyclePolicy:
        """The policy a lifecycle starts with: the settings of the same names."""
        return LifecyclePolicy.model_validate(self.model_dump(include=set(LifecyclePolicy.model_fields)))


def invalid_settings_message(error: ValidationError) -> str:
    """One line naming each bad setting's variable and its problem, never its value (maybe a secret)."""
    problems = (
        f"{ENV_PREFIX}{'_'.join(str(part) for part in problem['loc']).upper()}: {problem['msg']}"
        for problem in error.errors()
    )
    return f"invalid settings: {'; '.join(problems)}"
