"""What the tests need of the machine, checked once the tests are collected, so that a missing
piece stops the session with one line saying how to get it, before any test fails for want of it.
Each is needed only by the tests that use the fixture standing for it:

- `base_settings` (nearly every test): PostgreSQL and RabbitMQ answering where the settings say;
- `server_programs` (tests/test_crash.py): the programs of the private servers it restarts;
- `chromium` (the browser tests): Chromium or Chrome, which Playwright drives (no download of its own).

This module is loaded as a pytest plugin (tests/conftest.py): its hook runs the check, its fixtures
give the tests what was found.
"""

from __future__ import annotations

import shutil
from collections.abc import Collection
from pathlib import Path

import pytest

from devstack.dependencies import broker_address, database_address, shown
from devstack.servers import ServerUnavailable, answers, as_postgres_account
from shared.settings import Settings
from testsupport.servers import ServerPrograms

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
CHROMIUM_APPS = (
    Path("/Applications/Chromium.app/Contents/MacOS/Chromium"),
    Path("/Applications/Google Chrome.app/Contents/MacOS/Google Chrome"),
)
INSTALL_CHROMIUM = (
    "`sudo apt-get install chromium` (Debian; Ubuntu: chromium-browser), "
    "`brew install --cask chromium` or Google Chrome (macOS)"
)
START_POSTGRES = (
    "`sudo apt-get install postgresql` (Debian, Ubuntu), "
    "`brew install postgresql@16 && brew services start postgresql@16` (macOS), "
    "with the postgres user let in without a password (README.md, Prerequisites)"
)
START_RABBITMQ = (
    "`sudo apt-get install rabbitmq-server` (Debian, Ubuntu), "
    "`brew install rabbitmq && brew services start rabbitmq` (macOS)"
)


def chromium_executable() -> str | None:
    """Chromium's or Chrome's executable: on PATH by one of their usual names, or a macOS app."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found is not None:
            return found
    return next((str(app) for app in CHROMIUM_APPS if app.is_file()), None)


def missing_prerequisite(fixtures: Collection[str], settings: Settings) -> str | None:
    """The first thing that tests using `fixtures` need and this machine lacks, as one line that
    says how to get it; None when nothing is missing."""
    if "base_settings" in fixtures:
        if not answers(*database_address(settings.database_url)):
            where = shown(settings.database_url)
            return f"the tests need PostgreSQL, and nothing answers at {where}: {START_POSTGRES}"
        if not answers(*broker_address(settings.amqp_url)):
            where = shown(settings.amqp_url)
            return f"the tests need RabbitMQ, and nothing answers at {where}: {START_RABBITMQ}"
    if "server_programs" in fixtures:
        try:
            ServerPrograms.found()
            as_postgres_account()
        except ServerUnavailable as missing:
            return f"the crash tests start servers of their own, and {missing}"
    if "chromium" in fixtures and chromium_executable() is None:
        return f"the browser tests need Chromium or Chrome, and neither is installed: {INSTALL_CHROMIUM}"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Stop the session before its first test when the machine lacks what the selected tests need:
    one line saying what and how to get it, not a failure per test."""
    fixtures = {name for item in items if isinstance(item, pytest.Function) for name in item.fixturenames}
    missing = missing_prerequisite(fixtures, Settings())
    if missing is not None:
        pytest.exit(missing, returncode=pytest.ExitCode.USAGE_ERROR)


@pytest.fixture(scope="session")
def server_programs() -> ServerPrograms:
    """What the private servers are started from."""
    return ServerPrograms.found()


@pytest.fixture(scope="session")
def chromium() -> str:
    """The browser's executable."""
    executable = chromium_executable()
    assert executable is not None, "tests/conftest.py stops the session before a browser test without one"
    return executable
