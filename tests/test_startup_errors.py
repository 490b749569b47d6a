"""A service whose broker, database or Temporal does not answer at start: one line on stderr naming
where it looked (without the password) and the setting to change, exit code 2, no traceback."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

from devstack.stack import service_environment
from shared.settings import Settings
from testsupport.gateway import closed_port

REPO = Path(__file__).resolve().parents[1]
PATIENCE_SECONDS = 1.0
EXIT_SECONDS = 30.0  # mostly the imports of a slow machine, busy with other tests
PASSWORD = "s3cret"

DEPENDENCIES_OF = {
    "api": ("broker", "database", "temporal"),
    "bridge": ("broker", "database", "temporal"),
    "workers": ("broker", "database", "temporal"),
    "audit": ("broker", "database"),
}
PRODUCT = {"broker": "RabbitMQ", "database": "PostgreSQL", "temporal": "Temporal"}


def unanswered(dependency: str, port: int) -> tuple[dict[str, str], str, str]:
    """The setting that points `dependency` at `port` (with a password), where the line should say
    it looked, and the variable it should name."""
    match dependency:
        case "broker":
            url = f"amqp://guest:{PASSWORD}@127.0.0.1:{port}/"
            return {"amqp_url": url}, f"amqp://guest@127.0.0.1:{port}/", "ORDERFLOW_AMQP_URL"
        case "database":
            url = f"postgresql+asyncpg://postgres:{PASSWORD}@127.0.0.1:{port}/orderflow"
            shown = f"postgresql+asyncpg://postgres@127.0.0.1:{port}/orderflow"
            return {"database_url": url}, shown, "ORDERFLOW_DATABASE_URL"
        case _:
            address = f"127.0.0.1:{port}"
            return {"temporal_address": address}, address, "ORDERFLOW_TEMPORAL_ADDRESS"


async def run_until_exit(service: str, settings: Settings) -> tuple[int, str, str, float]:
    """`python -m services.<service>` until it exits: its exit code, stderr, stdout, and seconds."""
    env = service_environment(settings) | {
        "ORDERFLOW_STARTUP_PATIENCE_SECONDS": str(PATIENCE_SECONDS),
        "ORDERFLOW_API_PORT": str(closed_port()),
        "ORDERFLOW_BRIDGE_METRICS_PORT": "0",
        "ORDERFLOW_WORKER_METRICS_PORT": "0",
        "ORDERFLOW_AUDIT_METRICS_PORT": "0",
    }
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        f"services.{service}",
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), EXIT_SECONDS)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, stderr.decode(), stdout.decode(), time.monotonic() - started


@pytest.mark.parametrize(
    ("service", "dependency"),
    [
        (service, dependency)
        for service, dependencies in DEPENDENCIES_OF.items()
        for dependency in dependencies
    ],
)
async def test_a_dependency_that_does_not_answer_stops_the_start_with_one_line(
    settings: Settings, migrated_database: str, service: str, dependency: str
) -> None:
    port = closed_port()
    setting, shown, variable = unanswered(dependency, port)

    code, stderr, stdout, seconds = await run_until_exit(service, settings.model_copy(update=setting))

    assert code == 2, stderr + stdout
    expected = (
        f"orderflow-{service}: cannot reach {PRODUCT[dependency]} at {shown} (connection refused); "
        f"is it running? set {variable}"
    )
    assert stderr.splitlines() == [expected]
    assert PASSWORD not in stderr + stdout
    assert "Traceback" not in stderr + stdout
    assert seconds < EXIT_SECONDS


@pytest.mark.parametrize(
    ("setting", "line"),
    [
        (
            {"amqp_url": "amqp://guest:wrong@127.0.0.1:5672/"},
            (
                "orderflow-audit: RabbitMQ at amqp://guest@127.0.0.1:5672/ refused the connection "
                "(ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. For details "
                "see the broker logfile.); check ORDERFLOW_AMQP_URL"
            ),
        ),
        (
            {"database_url": "postgresql+asyncpg://postgres@127.0.0.1:5432/no_such_db"},
            (
                "orderflow-audit: PostgreSQL at postgresql+asyncpg://postgres@127.0.0.1:5432/no_such_db "
                'refused the connection (database "no_such_db" does not exist); '
                "check ORDERFLOW_DATABASE_URL"
            ),
        ),
    ],
    ids=["wrong broker password", "missing database"],
)
async def test_a_server_that_refuses_the_service_is_named_with_its_reason(
    settings: Settings, setting: dict[str, str], line: str
) -> None:
    code, stderr, stdout, _ = await run_until_exit("audit", settings.model_copy(update=setting))

    assert (code, stderr.splitlines()) == (2, [line]), stdout
    assert "wrong" not in stderr + stdout
