"""`make run` (python -m devstack): everything comes up, answers, and Ctrl-C stops it all;
several bridges and workers run side by side when the settings ask for them; the local issuer's key
is made on first start and the gateway trusts it."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import stat
import sys
from pathlib import Path

import httpx
import pytest

from devstack.stack import (
    for_a_person,
    free_port,
    instance_names,
    running_stack,
    service_environment,
    service_of,
    with_local_issuer,
)
from shared import local_issuer
from shared.contracts import Role
from shared.settings import Settings
from testsupport.polling import eventually

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
