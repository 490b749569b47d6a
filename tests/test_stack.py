"""`make run` (python -m services.stack): everything comes up, answers, and Ctrl-C stops it all."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import httpx
import pytest

from service_support import eventually
from services.stack import free_port, service_environment
from shared.settings import Settings

START_TIMEOUT_SECONDS = 60.0


async def test_the_run_command_starts_everything_and_stops_cleanly_on_ctrl_c(
    base_settings: Settings, migrated_database: str, tmp_path: Path
) -> None:
    temporal_port, api_port = free_port(), free_port()
    settings = base_settings.model_copy(
        update={
            "temporal_address": f"127.0.0.1:{temporal_port}",
            "api_port": api_port,
            "api_url": f"http://127.0.0.1:{api_port}",
        }
    )
    log_path = tmp_path / "run.log"
    with log_path.open("wb") as log:
        run = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.stack",
            cwd=tmp_path,  # its .run/ goes here
            env={**service_environment(settings), "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
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
        async with httpx.AsyncClient() as client:
            ui = await client.get(f"http://127.0.0.1:{temporal_port + 1000}/")
        assert ui.status_code == 200
    finally:
        run.send_signal(signal.SIGINT)
        exit_code = await asyncio.wait_for(run.wait(), 30)

    output = log_path.read_text()
    assert exit_code == 0, output
    assert f"API docs    {settings.api_url}/docs" in output
    assert "orderflow stopped." in output
    for service in ("api", "bridge", "workers", "audit"):
        assert f"\n{service:<8}| " in output, f"no log line from {service}"
    # nothing is left behind listening
    for port in (api_port, temporal_port):
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
    assert (tmp_path / ".run" / "temporal.db").exists()
    assert os.path.getsize(tmp_path / ".run" / "temporal.db") > 0
