"""All configuration, read once from the environment (prefix `ORDERFLOW_`) or a `.env` file; the
defaults are safe for a developer machine. `.env.example` documents every setting.
"""

from __future__ import annotations

from functools import lru_cache
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
# what each URL setting must start with; checked when settings are read, so a typo is reported as
# a bad setting at start-up rather than as a failed (or endlessly retried) connection later
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


def _empty_is_none(value: object) -> object:
    return None if value == "" else value


def _empty_is_zero(value: object) -> object:
    return 0 if value == "" else value


OptionalPath = Annotated[Path | None, BeforeValidator(_empty_is_none)]
"""A path; empty, as an unset variable in a compose file reads, means none."""
OptionalFile = Annotated[FilePath | None, BeforeValidator(_empty_is_none)]
"""An existing file; empty means none."""
KeyFile = Annotated[OptionalFile, Field(validate_default=True)]
"""A private key file, checked even when unset: it goes with its certificate (`CERTIFICATE_OF_KEY`)."""
Port = Annotated[int, BeforeValidator(_empty_is_zero), Field(ge=0, le=65535)]
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
    temporal_ui_url: str = Field(
        default="http://127.0.0.1:8233",
        description="the Temporal UI, for the dashboard's links to an order's workflow",
    )

    # task queues
    order_task_queue: str = "order-tq"
    shipping_task_queue: str = "shipping-tq"

    # broker queues owned by orderflow (the exchanges are the public contract and fixed)
    command_queue: str = Field(
        default="orders.commands.bridge", description="approve, cancel and update-address commands"
    )
    placement_queue: str = Field(
        default="orders.commands.place", description="PlaceOrder commands waiting for admission"
    )
    audit_queue: str = "orders.events.audit"
    command_prefetch: int = Field(default=64, ge=1)
    max_command_deliveries: int = Field(
        default=5, ge=1, description="deliveries of one command before it is dead-lettered"
    )
    placement_prefetch: int = Field(
        default=100, ge=1, description="placements one bridge holds (registered, waiting for a slot) at once"
    )
    audit_prefetch: int = Field(default=64, ge=1)
    audit_batch_linger_ms: int = Field(
        default=20,
        ge=0,
        le=1000,
        description="how long an audit batch gathers after its first event before it is written (0: at once)",
    )
    max_event_deliveries: int = Field(
        default=5, ge=1, description="deliveries of one event to the audit consumer before dead-lettering"
    )

    # admission and shedding: RabbitMQ holds the placements the running lifecycles leave waiting
    # what this machine kind sustains best (docs/performance.md): more at once only adds
    # contention; an order waiting for its reviewer gives its slot back meanwhile
    max_running_lifecycles: int = Field(
        default=12, ge=1, description="lifecycles running at once, across all bridges"
    )
    placement_backlog_limit: int = Field(
        default=2000,
        ge=1,
        description="placements waiting in the broker before new ones are refused (503 / negative confirm); "
        "fixed when the placement queue is first declared",
    )
    shed_retry_after_seconds: int = Field(
        default=5,
        ge=1,
        description="Retry-After of a 503 for a placement refused because the backlog is full",
    )

    workflow_sandbox: bool = Field(
        default=False,
        description="run workflows in Temporal's sandbox in production too (the tests always do); "
        "costs about a quarter of the workers' CPU",
    )

    # how many of each service `make run` starts (competing consumers / pollers)
    bridge_instances: int = Field(default=1, ge=1)
    worker_instances: int = Field(default=1, ge=1)

    # lifecycle timing: every lifecycle's own work ends within 15 s of its start; the time a
    # reviewer takes is bounded by the review window instead, long enough to approve by hand
    review_window_seconds: float = Field(default=300.0, gt=0)
    review_slot_grace_seconds: float = Field(
        default=1.0,
        ge=0,
        description="how long an order in review keeps its admission slot before giving it back "
        "while it waits for its reviewer (an approval within it costs no slot hand-over)",
    )
    lifecycle_deadline_seconds: float = Field(default=14.0, gt=0)
    max_shipping_attempts: int = Field(default=3, ge=1)
    activity_attempt_timeout_seconds: float = Field(
        default=0.3, gt=0, description="start-to-close of one business-step attempt"
    )
    parallel_attempts: int = Field(
        default=3, ge=1, le=5, description="attempts of one business step in flight at once"
    )
    dispatch_attempts_per_shipment: int = Field(default=12, ge=1)

    # HTTP gateway
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_url: str = "http://127.0.0.1:8000"

    # starting and stopping
    startup_patience_seconds: float = Field(
        default=60.0,
        ge=0,
        description="how long a starting service waits for its broker, database and Temporal to answer "
        "before it exits, naming the one that did not",
    )
    drain_seconds: int = Field(
        default=DRAIN_SECONDS, ge=1, description="how long a service stopping lets the work in hand finish"
    )

    log_level: str = "INFO"
    log_json: bool = True

    # metrics (Prometheus) and probes: the gateway serves /metrics, /healthz and /readyz on its own
    # port, the others on these
    metrics_host: str = Field(
        default="127.0.0.1",
        description="where the metrics and probe endpoints listen (0.0.0.0: reachable from other hosts)",
    )
    bridge_metrics_port: Port = Field(default=9110, description="`make run` counts up for more bridges")
    worker_metrics_port: Port = 9120
    audit_metrics_port: Port = 9130

    # --- security: identity at the gateway (docs/security.md) ---
    auth_issuer: str = Field(
        default="", description="the `iss` of accepted bearer tokens (an OIDC issuer URL, say)"
    )
    auth_jwks_url: str = Field(default="", description="where the issuer publishes its signing keys (JWKS)")
    auth_audience: str = Field(default="orderflow", description="the `aud` accepted tokens must carry")
    auth_algorithms: list[str] = Field(
        default=["RS256", "ES256", "PS256", "EdDSA"],
        description="signature algorithms accepted (asymmetric only; `none` and HMAC never)",
    )
    auth_roles_claim: str = Field(
        default="roles", description="the claim holding the caller's roles; dots nest (`realm_access.roles`)"
    )
    auth_clock_skew_seconds: int = Field(default=30, ge=0, le=600)
    auth_jwks_cache_seconds: int = Field(
        default=300, ge=1, description="how long fetched keys are trusted before the JWKS is read again"
    )
    auth_local_issuer: bool = Field(
        default=False,
        description="trust the local development issuer (`make run` turns it on; never in production)",
    )
    auth_local_issuer_key_file: Path = Field(
        default=Path(".run/local-issuer.pem"),
        description="the local issuer's signing key (created by `make run`)",
    )
    auth_local_token_lifetime_seconds: int = Field(default=8 * 3600, ge=60)

    # --- security: AMQP publishers' roles (docs/security.md) ---
    amqp_publisher_roles: dict[str, list[Role]] = Field(
        default={},
        description="broker user -> the roles its commands carry (JSON); a user not named has none",
    )
    amqp_delegates: list[str] = Field(
        default=[],
        description="broker users trusted to name the command's issuer themselves (`issued_by`): "
        "the gateway's, which sets it from the bearer token",
    )
    # --- security: broker users and TLS for AMQP and PostgreSQL (docs/security.md) ---
    # secrets come from files (Docker/Kubernetes secrets) so that no URL or environment holds them
    amqp_password_file: OptionalFile = Field(None, description="replaces the password in amqp_url")
    amqp_ca_file: OptionalFile = Field(None, description="CAs the broker must chain to (default: system's)")
    amqp_cert_file: OptionalFile = Field(None, description="client certificate (mutual TLS)")
    amqp_key_file: KeyFile = None
    database_password_file: OptionalFile = Field(None, description="replaces the password in database_url")
    database_sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] = Field(
        default="prefer", description="as libpq's sslmode: verify-full checks the server's name too"
    )
    database_sslrootcert: OptionalFile = Field(
        None, description="CAs the server must chain to (default: system's)"
    )
    database_sslcert: OptionalFile = Field(None, description="client certificate (mutual TLS)")
    database_sslkey: KeyFile = None
    api_tls_cert_file: OptionalFile = Field(None, description="the gateway's HTTPS certificate (chain)")
    api_tls_key_file: KeyFile = None
    api_forwarded_allow_ips: str = Field(
        default="",
        description="reverse proxies (comma-separated IPs or networks) whose X-Forwarded-For/-Proto "
        "the gateway believes; empty: none",
    )

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

    # --- security: Temporal connection and payload encryption (docs/security.md) ---
    # TLS, mTLS and API keys for Temporal come from Temporal's own TEMPORAL_* variables and profiles
    # file (shared/temporal.py), whose address and namespace win over temporal_address/_namespace
    payload_keys: SecretStr = Field(
        default=SecretStr(""),
        description="payload encryption keys, `id:base64-of-32-bytes`, comma-separated; the first encrypts",
    )
    payload_keys_file: OptionalPath = Field(
        default=None, description="a file of payload keys, one `id:base64` a line (after payload_keys)"
    )
    codec_cors_origins: list[str] = Field(
        default=["http://127.0.0.1:8233", "http://localhost:8233"],
        description="origins (JSON list) whose pages may call the codec endpoints: the Temporal UI's",
    )

    # --- security: abuse limits at the gateway (docs/security.md) ---
    api_max_body_bytes: int = Field(
        default=64 * 1024, ge=1024, description="larger request bodies get 413 before they are parsed"
    )
    api_write_rate_limit: str = Field(
        default="20/second;1000/minute",
        description="state-changing requests per caller and gateway process (`N/second;M/minute`); "
        "beyond, 429 with Retry-After",
    )
    api_max_streams_per_caller: int = Field(
        default=4, ge=1, description="event streams one caller may have open at once (per gateway process)"
    )

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


@lru_cache
def get_settings() -> Settings:
    return Settings()


def invalid_settings_message(error: ValidationError) -> str:
    """One line naming each bad setting by its environment variable, and what is wrong with it
    (not its value, which may be a secret)."""
    problems = (
        f"{ENV_PREFIX}{'_'.join(str(part) for part in problem['loc']).upper()}: {problem['msg']}"
        for problem in error.errors()
    )
    return f"invalid settings: {'; '.join(problems)}"
