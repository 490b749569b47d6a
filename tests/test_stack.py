"""`make run` (python -m devstack): everything comes up, answers, and Ctrl-C stops it all;
several bridges and workers run side by side when the settings ask for them; the local issuer's key
is made on first start and the gateway trusts it. Where nothing answers at the default database or
broker URL it starts an embedded PostgreSQL or a private RabbitMQ, with their data in its run
folder; a configured server that does not answer is one line and exit code 1."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from devstack import servers
from devstack.dependencies import local_dependencies, startable_broker, startable_database
from devstack.servers import ServerUnavailable, answers
from devstack.stack import (
    for_a_person,
    free_port,
    instance_names,
    running_stack,
    service_environment,
    service_of,
    with_broker_accounts,
    with_local_issuer,
)
from shared import broker, local_issuer, schema
from shared.contracts import Role
from shared.settings import Settings
from testsupport.polling import eventually
from testsupport.servers import reachable_directory

START_TIMEOUT_SECONDS = 60.0
REPO = Path(__file__).resolve().parents[1]


async def test_the_run_command_starts_everything_and_stops_cleanly_on_ctrl_c(
    base_settings: Settings, migrated_database: str, tmp_path: Path
) -> None:
    temporal_port, api_port = free_port(), free_port()
    settings = base_settings.model_copy(
        update={
            "temporal_address": f"127.0.0.1:{temporal_port}",
            "api_port": api_port,
            "api_url": f"http://127.0.0.1:{api_port}",
            "bridge_instances": 2,
            "worker_instances": 2,
        }
    )
    env = service_environment(settings) | {"PYTHONPATH": str(REPO)}
    # as on a fresh clone: nothing said about the local issuer, whose key is made in .run/
    for name in ("ORDERFLOW_AUTH_LOCAL_ISSUER", "ORDERFLOW_AUTH_LOCAL_ISSUER_KEY_FILE"):
        del env[name]
    # and no payload keys: `make run` makes them in .run/ too
    for name in ("ORDERFLOW_PAYLOAD_KEYS", "ORDERFLOW_PAYLOAD_KEYS_FILE"):
        env.pop(name, None)
    key_file = tmp_path / ".run" / "local-issuer.pem"
    log_path = tmp_path / "run.log"
    with log_path.open("wb") as log:
        run = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "devstack",
            cwd=tmp_path,  # its .run/ goes here
            env=env,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:

        async def ready() -> bool:
            try:
                async with httpx.AsyncClient() as client:
                    answer = await client.get(f"{settings.api_url}/readyz")
            except httpx.TransportError:
                return False
            return answer.status_code == 200

        await eventually(ready, START_TIMEOUT_SECONDS)
        token = local_issuer.mint_token(
            settings.model_copy(update={"auth_local_issuer_key_file": key_file}),
            "rita",
            [Role.REVIEWER],
            lifetime_seconds=60,
        )
        async with httpx.AsyncClient() as client:
            ui = await client.get(f"http://127.0.0.1:{temporal_port + 1000}/")
            ui_settings = await client.get(f"http://127.0.0.1:{temporal_port + 1000}/api/v1/settings")
            signed_in = await client.get(
                f"{settings.api_url}/orders", headers={"Authorization": f"Bearer {token}"}
            )
            anonymous = await client.get(f"{settings.api_url}/orders")
        assert ui.status_code == 200
        assert ui_settings.json()["Codec"]["Endpoint"] == f"{settings.api_url}/codec"
        assert (signed_in.status_code, anonymous.status_code) == (200, 401)
    finally:
        run.send_signal(signal.SIGINT)
        exit_code = await asyncio.wait_for(run.wait(), 30)

    output = log_path.read_text()
    assert exit_code == 0, output
    assert f"API docs    {settings.api_url}/docs" in output
    assert f"Dashboard   {settings.api_url}/dashboard" in output
    assert "orderflow stopped." in output
    assert "Sign in     orderflow token --role reviewer --subject rita " in output
    assert "orderflow token --role reviewer --subject rita --link " in output
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key_lines = key_file.read_text().splitlines()[1:-1]  # the key itself, without its PEM armour
    assert not any(line in output for line in key_lines)
    payload_keys = tmp_path / ".run" / "payload-keys"
    assert stat.S_IMODE(payload_keys.stat().st_mode) == 0o600
    assert payload_keys.read_text().partition(":")[2].strip() not in output
    for name in ("api", "bridge-1", "bridge-2", "workers-1", "workers-2", "audit"):
        assert f"\n{name:<8}| " in output, f"no log line from {name}"
    # nothing is left behind listening
    for port in (api_port, temporal_port):
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)
    assert (tmp_path / ".run" / "temporal.db").stat().st_size > 0


def test_make_run_logs_readable_lines_unless_json_was_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORDERFLOW_LOG_JSON", raising=False)
    assert Settings(_env_file=None).log_json is True  # a service on its own
    assert for_a_person(Settings(_env_file=None)).log_json is False
    monkeypatch.setenv("ORDERFLOW_LOG_JSON", "true")
    assert for_a_person(Settings(_env_file=None)).log_json is True


def test_make_run_uses_the_local_issuer_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    key_file = tmp_path / "run" / "local-issuer.pem"
    monkeypatch.setenv("ORDERFLOW_AUTH_LOCAL_ISSUER_KEY_FILE", str(key_file))
    monkeypatch.setenv("ORDERFLOW_AUTH_LOCAL_ISSUER", "false")
    switched_off = with_local_issuer(Settings(_env_file=None))
    assert not switched_off.auth_local_issuer and not key_file.exists()

    monkeypatch.delenv("ORDERFLOW_AUTH_LOCAL_ISSUER")
    assert Settings(_env_file=None).auth_local_issuer is False  # a gateway on its own: off
    made = with_local_issuer(Settings(_env_file=None))
    assert made.auth_local_issuer is True
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_bytes()
    with_local_issuer(Settings(_env_file=None))
    assert key_file.read_bytes() == key  # made once: tokens minted before a restart stay good


def test_the_services_read_back_the_settings_they_are_given(monkeypatch: pytest.MonkeyPatch) -> None:
    given = Settings(
        _env_file=None,
        auth_algorithms=["ES256"],
        amqp_publisher_roles={"shop": [Role.CUSTOMER]},
        review_window_seconds=12.5,
        auth_local_issuer=True,
    )
    for name, value in service_environment(given).items():
        monkeypatch.setenv(name, value)

    assert Settings(_env_file=None) == given


def test_instances_are_named_after_their_service() -> None:
    assert instance_names("bridge", 1) == ["bridge"]
    assert instance_names("workers", 3) == ["workers-1", "workers-2", "workers-3"]
    assert [service_of(n) for n in ("bridge", "bridge-2", "workers-10", "temporal")] == [
        "bridge",
        "bridge",
        "workers",
        "temporal",
    ]


async def test_several_bridges_and_workers_start_restart_and_stop(
    settings: Settings, migrated_database: str
) -> None:
    settings = settings.model_copy(update={"bridge_instances": 2, "worker_instances": 2})
    log = io.StringIO()
    async with running_stack(settings, temporal=None, log=log, services=("bridge", "workers")) as stack:
        assert stack.instances("bridge") == ["bridge-1", "bridge-2"]
        assert stack.instances("workers") == ["workers-1", "workers-2"]

        async def all_logged() -> bool:
            return all(f"\n{name:<8}| " in "\n" + log.getvalue() for name in stack.pids())

        await eventually(all_logged, START_TIMEOUT_SECONDS)
        before = stack.pids()
        await stack.crash_and_restart("bridge")  # a service: every instance of it
        after = stack.pids()
        assert all(after[name] != before[name] for name in ("bridge-1", "bridge-2"))
        assert all(after[name] == before[name] for name in ("workers-1", "workers-2"))
        await stack.crash_and_restart("workers-2")  # one instance
        assert stack.pids()["workers-2"] != before["workers-2"]
        assert stack.pids()["workers-1"] == before["workers-1"]
        pids = list(stack.pids().values())
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """`make run`'s folder for its servers' data."""
    directory = reachable_directory()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize(
    ("url", "startable"),
    [
        ("postgresql+asyncpg://postgres@127.0.0.1:5432/orderflow", True),
        ("postgresql+asyncpg://postgres@127.0.0.1:5439/orderflow_dev", True),
        ("postgresql+asyncpg://postgres:secret@127.0.0.1:5432/orderflow", False),
        ("postgresql+asyncpg://orderflow@127.0.0.1:5432/orderflow", False),
        ("postgresql+asyncpg://postgres@db.internal:5432/orderflow", False),
        ("amqp://guest:guest@127.0.0.1:5672/", True),
        ("amqp://guest:guest@127.0.0.1:5673", True),
        ("amqp://guest:guest@127.0.0.1:5672/orders", False),
        ("amqp://orderflow:secret@127.0.0.1:5672/", False),
        ("amqps://guest:guest@127.0.0.1:5671/", False),
    ],
)
def test_make_run_may_start_a_server_at_the_default_url_on_any_port(url: str, startable: bool) -> None:
    may_start = startable_broker if url.startswith("amqp") else startable_database
    assert may_start(url) is startable


async def test_make_run_starts_an_embedded_postgresql_where_nothing_answers_at_the_default_url(
    base_settings: Settings, run_dir: Path
) -> None:
    port = free_port()
    database_url = f"postgresql+asyncpg://postgres@127.0.0.1:{port}/orderflow"
    settings = base_settings.model_copy(update={"database_url": database_url})

    async with local_dependencies(settings, run_dir):
        await schema.ensure_database(database_url)
    assert not answers("127.0.0.1", port)  # stopped with `make run`

    async with local_dependencies(settings, run_dir):  # the next `make run`: the same data
        server = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres", database="orderflow")
        try:
            assert await server.fetchval("SELECT current_database()") == "orderflow"
        finally:
            await server.close()
    assert not answers("127.0.0.1", port)
    assert (run_dir / "postgres" / "data" / "PG_VERSION").is_file()


async def test_make_run_starts_a_private_rabbitmq_where_nothing_answers_at_the_default_url(
    base_settings: Settings, run_dir: Path
) -> None:
    port = free_port()
    settings = base_settings.model_copy(update={"amqp_url": f"amqp://guest:guest@127.0.0.1:{port}/"})
    environment_before = dict(os.environ)

    async with local_dependencies(settings, run_dir):
        # rabbitmqctl makes the services' broker users on it, as under `make run`
        _, accounts = await with_broker_accounts(settings, run_dir)
        bridge = settings.model_copy(
            update={
                "amqp_url": accounts["bridge"]["ORDERFLOW_AMQP_URL"],
                "amqp_password_file": Path(accounts["bridge"]["ORDERFLOW_AMQP_PASSWORD_FILE"]),
            }
        )
        connection = await broker.connect(bridge, "stack-tests", patience=0)
        await connection.close()
    assert not answers("127.0.0.1", port)
    assert dict(os.environ) == environment_before
    assert (run_dir / "rabbitmq" / "mnesia").is_dir()


async def test_make_run_says_how_to_get_rabbitmq_where_none_answers_and_none_is_installed(
    base_settings: Settings, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(run_dir))
    monkeypatch.setattr(servers, "RABBITMQ_SERVER_PLACES", ())
    port = free_port()
    settings = base_settings.model_copy(update={"amqp_url": f"amqp://guest:guest@127.0.0.1:{port}/"})

    with pytest.raises(ServerUnavailable) as refused:
        async with local_dependencies(settings, run_dir):
            pass

    assert str(refused.value) == (
        f"nothing answers at amqp://guest@127.0.0.1:{port}/, and rabbitmq-server is not installed: "
        "`sudo apt-get install rabbitmq-server` (Debian, Ubuntu), `brew install rabbitmq` (macOS), or "
        "`docker compose -f compose/compose.yaml up -d rabbitmq` with "
        "ORDERFLOW_AMQP_URL=amqp://orderflow:orderflow@127.0.0.1:5672/"
    )


def test_make_run_names_a_configured_database_that_does_not_answer_in_one_line(tmp_path: Path) -> None:
    port = free_port()
    unset = {name: value for name, value in os.environ.items() if not name.startswith("ORDERFLOW_")}
    env = unset | {
        "PYTHONPATH": str(REPO),
        "ORDERFLOW_DATABASE_URL": f"postgresql+asyncpg://orderflow:s3cret@127.0.0.1:{port}/orderflow",
    }

    run = subprocess.run(
        [sys.executable, "-m", "devstack"], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
    )

    shown = f"postgresql+asyncpg://orderflow@127.0.0.1:{port}/orderflow"  # no password
    said = (
        f"make run: nothing answers at {shown} (ORDERFLOW_DATABASE_URL): start it, or unset "
        "ORDERFLOW_DATABASE_URL for a server of make run's own"
    )
    assert run.returncode == 1
    assert run.stderr.splitlines() == [said]
    assert run.stdout == ""
