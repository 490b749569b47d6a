"""compose/compose.yaml, checked without a Docker engine (the project's machines have none): valid by
the Compose Specification's JSON schema (kept beside it), every dependency a service waits for
exists and is waited for as it should be, every service that keeps running has a health check (an
orderflow process its /readyz, on a port of its own), every ORDERFLOW_* variable is a setting and the
settings each orderflow process gets are valid, every image is pinned to a release, each process
connects to the broker as its own user with its password from a mounted secret, and each is given
the time to drain before it is killed.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema_rs
import pytest
import yaml

from services.workers.visibility import SEARCH_ATTRIBUTES
from shared.settings import ENV_PREFIX, Settings

COMPOSE_DIR = Path(__file__).resolve().parents[1] / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
SCHEMA_FILE = COMPOSE_DIR / "compose-spec.schema.json"
RUNS_ONCE = "no"  # the restart policy of a job that does its work and exits
SECRETS_DIR = "/run/secrets/"
# the orderflow processes, and the setting of the port each serves its probes on
PROBE_PORT_SETTINGS = {
    "api": "api_port",
    "bridge": "bridge_metrics_port",
    "workers": "worker_metrics_port",
    "audit": "audit_metrics_port",
}
# how many numbers a release's version has: PostgreSQL's are major.minor (since 10)
VERSION_PARTS = {"postgres": 2}
DEFAULT_VERSION_PARTS = 3
DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|ns|m|s)")  # Go's, as Compose reads them
SECONDS_PER_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
DOCKER_STOP_GRACE = "10s"  # what Docker waits for after SIGTERM unless told otherwise

Service = dict[str, Any]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Service]:
    found: dict[str, Service] = compose["services"]
    return found


def test_the_file_is_valid_by_the_compose_specification(compose: dict[str, Any]) -> None:
    validator = jsonschema_rs.validator_for(
        json.loads(SCHEMA_FILE.read_text()), formats={"duration": is_duration}, validate_formats=True
    )

    errors = [f"{path_of(error.instance_path)}: {error.message}" for error in validator.iter_errors(compose)]
    assert errors == []

    # the schema is no formality: a condition Compose does not know, a duration it cannot read
    unknown_condition = copy.deepcopy(compose)
    unknown_condition["services"]["api"]["depends_on"]["migrate"]["condition"] = "service_done"
    assert not validator.is_valid(unknown_condition)
    unreadable_duration = copy.deepcopy(compose)
    unreadable_duration["services"]["api"]["stop_grace_period"] = "ten seconds"
    assert not validator.is_valid(unreadable_duration)


def test_every_dependency_exists_and_is_waited_for_until_it_is_healthy_or_done(
    services: dict[str, Service],
) -> None:
    for name, service in services.items():
        dependencies = service.get("depends_on", {})
        assert isinstance(dependencies, dict), f"{name}: depends_on names no conditions"
        for dependency, waiting in dependencies.items():
            assert dependency in services, f"{name} depends on {dependency}, which is no service"
            expected = (
                "service_completed_successfully" if runs_once(services[dependency]) else "service_healthy"
            )
            assert waiting["condition"] == expected, f"{name} waits for {dependency}"


def test_every_service_that_keeps_running_has_a_health_check(services: dict[str, Service]) -> None:
    assert all("restart" in service for service in services.values()), "a restart policy left to chance"
    unchecked = [
        name for name, service in services.items() if not runs_once(service) and "healthcheck" not in service
    ]
    assert unchecked == []


def test_each_orderflow_process_is_probed_for_readiness_on_its_own_published_port(
    services: dict[str, Service],
) -> None:
    for name, setting in PROBE_PORT_SETTINGS.items():
        service = services[name]
        port = int(service["environment"][variable(setting)])
        assert f"http://127.0.0.1:{port}/readyz" in " ".join(service["healthcheck"]["test"]), name
        assert port in {container_port(published) for published in service["ports"]}, name
        if name != "api":  # which serves its probes and metrics where it serves its API
            assert service["environment"][variable("metrics_host")] == "0.0.0.0", f"{name}: container only"


def test_every_orderflow_variable_is_a_setting(compose: dict[str, Any]) -> None:
    settings = {variable(name) for name in Settings.model_fields}
    for name, service in environments(compose):
        unknown = sorted(key for key in service if key.startswith(ENV_PREFIX) and key not in settings)
        assert unknown == [], f"{name} sets what no setting reads"


def test_every_orderflow_process_gets_valid_settings(
    services: dict[str, Service], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # secrets are mounted at their paths in the container; a file stands in for each here
    secret = tmp_path / "secret"
    secret.write_text("not a secret\n")
    for name in PROBE_PORT_SETTINGS:
        with monkeypatch.context() as environment:
            environment.chdir(tmp_path)  # no .env: the service's environment alone
            for key in list(os.environ):
                if key.startswith(ENV_PREFIX):
                    environment.delenv(key)
            for key, value in services[name]["environment"].items():
                environment.setenv(key, str(secret) if value.startswith(SECRETS_DIR) else value)
            Settings()  # raises, naming each setting that is not valid


def test_every_image_is_pinned_to_a_release(services: dict[str, Service]) -> None:
    images = [service["image"] for service in services.values() if "build" not in service]
    assert images and [image for image in images if not pinned(image)] == []


def test_each_orderflow_process_is_its_own_broker_user_with_its_password_in_a_secret(
    compose: dict[str, Any], services: dict[str, Service]
) -> None:
    users = []
    for name in PROBE_PORT_SETTINGS:
        environment = services[name]["environment"]
        broker_url = urlsplit(environment[variable("amqp_url")])
        assert broker_url.password is None, f"{name}: a password in the broker URL"
        assert environment[variable("amqp_password_file")].startswith(SECRETS_DIR), name
        users.append(broker_url.username)
    assert len(set(users)) == len(users) and "orderflow" not in users  # not the administrator

    for name, service in services.items():
        mounted = {mounted_at(secret) for secret in service.get("secrets", [])}
        wanted = {
            value.removeprefix(SECRETS_DIR)
            for value in service.get("environment", {}).values()
            if value.startswith(SECRETS_DIR)
        }
        assert wanted <= mounted, f"{name} reads secrets it is not given"
        given = {source_of(secret) for secret in service.get("secrets", [])}
        assert given <= set(compose["secrets"]), f"{name} is given secrets that are not defined"


def test_each_orderflow_process_may_drain_before_it_is_killed(services: dict[str, Service]) -> None:
    for name in PROBE_PORT_SETTINGS:
        service = services[name]
        default_drain = Settings.model_fields["drain_seconds"].default
        drain = float(service["environment"].get(variable("drain_seconds"), default_drain))
        assert seconds(service.get("stop_grace_period", DOCKER_STOP_GRACE)) > drain, name


def test_compose_interpolates_nothing() -> None:
    # no variables: a shell's `$` is written `$$`, which Compose hands on as `$`
    assert "$" not in COMPOSE_FILE.read_text().replace("$$", "")


def runs_once(service: Service) -> bool:
    return service.get("restart") == RUNS_ONCE


def variable(setting: str) -> str:
    return f"{ENV_PREFIX}{setting.upper()}"


def environments(compose: dict[str, Any]) -> Iterator[tuple[str, dict[str, str]]]:
    """Each service's environment, and the shared one (`x-environment`)."""
    yield "x-environment", compose["x-environment"]
    for name, service in compose["services"].items():
        yield name, service.get("environment", {})


def container_port(published: str) -> int:
    """`127.0.0.1:9110-9119:9110` publishes the container's port 9110."""
    return int(published.rsplit(":", 1)[1])


def source_of(secret: str | dict[str, str]) -> str:
    """Which of the secrets a service is given."""
    return secret if isinstance(secret, str) else secret["source"]


def mounted_at(secret: str | dict[str, str]) -> str:
    """Where in /run/secrets/ a service's secret is."""
    return secret if isinstance(secret, str) else secret.get("target", secret["source"])


def pinned(image: str) -> bool:
    """`rabbitmq:4.3.6-management` is; `postgres:15`, `rabbitmq:4.3-management` and `latest` are not."""
    name, _, tag = image.rpartition(":")
    version = re.match(r"\d+(?:\.\d+)*", tag)
    release_parts = VERSION_PARTS.get(name, DEFAULT_VERSION_PARTS)
    return version is not None and len(version[0].split(".")) == release_parts


def is_duration(text: str) -> bool:
    return DURATION_PART.sub("", text) == "" and text != ""


def seconds(duration: str) -> float:
    assert is_duration(duration), duration
    return sum(float(amount) * SECONDS_PER_UNIT[unit] for amount, unit in DURATION_PART.findall(duration))


def path_of(instance_path: list[str | int]) -> str:
    return "/".join(str(part) for part in instance_path)


def test_temporal_is_given_every_search_attribute_the_workers_need(services: dict[str, Service]) -> None:
    script = "\n".join(services["temporal-namespace"]["command"])
    created = set(re.findall(r"retry searchable (\w+) (\w+)", script))
    assert created == {(key.name, key.indexed_value_type.name.capitalize()) for key in SEARCH_ATTRIBUTES}
