"""Configuration: every setting is documented in .env.example, and nonsense is refused."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from shared.settings import Settings, invalid_settings_message

ENV_EXAMPLE = Path(__file__).resolve().parents[1] / ".env.example"


def documented_settings() -> dict[str, str]:
    lines = ENV_EXAMPLE.read_text().splitlines()
    assignments = (line.partition("=") for line in lines if line.startswith("ORDERFLOW_"))
    return {name: value for name, _, value in assignments}


def test_env_example_lists_every_setting_with_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    documented = documented_settings()
    defaults = Settings(_env_file=None)
    for name in Settings.model_fields:
        key = f"ORDERFLOW_{name.upper()}"
        assert key in documented, f"{key} is missing from .env.example"
        with monkeypatch.context() as patch:
            patch.setenv(key, documented[key])
            parsed = Settings(_env_file=None)
        assert getattr(parsed, name) == getattr(defaults, name), f"{key} in .env.example is not the default"
    assert len(documented) == len(Settings.model_fields)


def refusal(**environment: str) -> str:
    """The message for settings read from this environment (and no .env file)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment.items():
            patch.setenv(name, value)
        with pytest.raises(ValidationError) as refused:
            Settings(_env_file=None)
    return invalid_settings_message(refused.value)


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        ("ORDERFLOW_API_PORT", "abc", "valid integer"),
        ("ORDERFLOW_AMQP_URL", "guest@127.0.0.1:5672", "amqp://host:port/"),
        ("ORDERFLOW_API_URL", "127.0.0.1:8000", "http://host:port/"),
        ("ORDERFLOW_API_URL", "http://[::1", "http://host:port/"),
        ("ORDERFLOW_DATABASE_URL", "mysql://127.0.0.1/orderflow", "PostgreSQL URL"),
        ("ORDERFLOW_DATABASE_URL", "orderflow", "PostgreSQL URL"),
    ],
)
def test_a_bad_setting_is_named_in_one_line(variable: str, value: str, reason: str) -> None:
    message = refusal(**{variable: value})

    assert message.startswith(f"invalid settings: {variable}: ")
    assert reason in message
    assert "\n" not in message


def test_every_bad_setting_is_named() -> None:
    message = refusal(ORDERFLOW_API_PORT="abc", ORDERFLOW_LOG_JSON="maybe")

    assert "ORDERFLOW_API_PORT: " in message and "ORDERFLOW_LOG_JSON: " in message


def test_a_refused_url_is_not_repeated_as_it_may_hold_a_password() -> None:
    message = refusal(ORDERFLOW_AMQP_URL="amqp//orderflow:s3cret@rabbitmq:5672/")

    assert "s3cret" not in message


@pytest.mark.parametrize("service", ["api", "bridge", "workers", "audit"])
def test_a_service_with_a_bad_setting_exits_with_one_log_line(service: str) -> None:
    environment = {**os.environ, "ORDERFLOW_API_PORT": "abc"}

    finished = subprocess.run(
        [sys.executable, "-m", f"services.{service}"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert finished.returncode == 2, finished.stderr
    assert finished.stderr == ""
    (line,) = finished.stdout.splitlines()
    logged = json.loads(line)
    assert logged["level"] == "critical" and logged["service"] == service
    assert logged["event"].startswith("invalid settings: ORDERFLOW_API_PORT: ")


@pytest.mark.parametrize(
    ("environment", "reason"),
    [
        (
            {"ORDERFLOW_AMQP_URL": "amqps://rabbit:5671/", "ORDERFLOW_AMQP_CERT_FILE": "{file}"},
            "ORDERFLOW_AMQP_KEY_FILE: should be set together with",
        ),
        ({"ORDERFLOW_API_TLS_KEY_FILE": "{file}"}, "ORDERFLOW_API_TLS_KEY_FILE: should be set together with"),
        ({"ORDERFLOW_AMQP_CA_FILE": "{file}"}, "ORDERFLOW_AMQP_CA_FILE: needs an amqps://"),
        (
            {"ORDERFLOW_DATABASE_SSLROOTCERT": "{file}"},
            "ORDERFLOW_DATABASE_SSLROOTCERT: needs ORDERFLOW_DATABASE_SSLMODE",
        ),
        ({"ORDERFLOW_DATABASE_SSLMODE": "on"}, "ORDERFLOW_DATABASE_SSLMODE"),
        ({"ORDERFLOW_AMQP_PASSWORD_FILE": "/nonexistent/password"}, "ORDERFLOW_AMQP_PASSWORD_FILE"),
        ({"ORDERFLOW_API_FORWARDED_ALLOW_IPS": "10.0.0.1, proxy"}, "IP addresses or networks"),
    ],
)
def test_tls_and_secret_files_are_checked(environment: dict[str, str], reason: str, tmp_path: Path) -> None:
    file = tmp_path / "file.pem"
    file.write_text("not a secret to repeat")
    message = refusal(**{name: value.format(file=file) for name, value in environment.items()})
    assert reason in message
    assert "not a secret to repeat" not in message


def test_tls_settings_that_belong_together_are_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.touch()
    key.touch()
    environment = {
        "ORDERFLOW_AMQP_URL": "amqps://orderflow-gateway@rabbit:5671/",
        "ORDERFLOW_AMQP_CA_FILE": cert,
        "ORDERFLOW_AMQP_CERT_FILE": cert,
        "ORDERFLOW_AMQP_KEY_FILE": key,
        "ORDERFLOW_DATABASE_SSLMODE": "verify-full",
        "ORDERFLOW_DATABASE_SSLROOTCERT": cert,
        "ORDERFLOW_API_TLS_CERT_FILE": cert,
        "ORDERFLOW_API_TLS_KEY_FILE": key,
        "ORDERFLOW_API_FORWARDED_ALLOW_IPS": "10.0.0.0/8,*",
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, str(value))
    settings = Settings(_env_file=None)
    assert (settings.amqp_key_file, settings.api_tls_key_file, settings.database_sslrootcert) == (
        key,
        key,
        cert,
    )
