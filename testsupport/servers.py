"""PostgreSQL and RabbitMQ servers of our own, for what restarts them (tests/test_crash.py,
bench/chaos.py), and a client's publish that rides out such a restart.

The machine's servers on 5432 and 5672 are shared with whoever else runs tests at the same time, so
whatever restarts a server restarts one started here: on free ports, with its data in a temporary
directory that goes when it stops. A restart keeps the data, as a real one does.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

from aio_pika.exceptions import CONNECTION_EXCEPTIONS

from devstack.stack import free_port, wait_for_port
from shared import broker
from shared.contracts import Command

POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")  # Debian's; its tools are not on the PATH
# the server script itself: the /usr/sbin wrapper would switch to the rabbitmq user and its home
RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 30.0
PUBLISH_ATTEMPT_SECONDS = 5.0
PUBLISH_RETRY_SECONDS = 0.2
PUBLISH_PATIENCE_SECONDS = 60.0


async def run(*command: str) -> None:
    """Run a command to its end; raise with its output if it failed."""
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await process.communicate()
    if process.returncode:
        raise RuntimeError(
            f"{' '.join(command)} exited {process.returncode}: {output.decode(errors='replace')}"
        )


class PrivatePostgres:
    """A cluster of its own (initdb), run by pg_ctl: as the postgres user when we are root, since
    PostgreSQL refuses to run as root. Trust authentication on 127.0.0.1, like the machine's."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self._directory = directory
        self._as_owner: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(directory, "postgres")
            self._as_owner = ["runuser", "-u", "postgres", "--"]

    def database_url(self, database: str) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    async def start(self) -> None:
        """The first start creates the cluster."""
        if not (self._directory / "data").exists():
            await self._pg_ctl("initdb", "-o", "--auth=trust --username=postgres --encoding=UTF8 --no-sync")
        options = f"-p {self.port} -k {self._directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        await self._pg_ctl("start", "-o", options)

    async def stop(self) -> None:
        """A fast shutdown: open sessions are ended, as in any restart."""
        await self._pg_ctl("stop", "-m", "fast")

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def _pg_ctl(self, action: str, *options: str) -> None:
        # -l: the server's output goes to a file, not to the pipe that run() reads to its end
        log = self._directory / "server.log"
        data = self._directory / "data"
        await run(
            *self._as_owner,
            str(POSTGRES_BIN / "pg_ctl"),
            action,
            "-w",
            "-D",
            str(data),
            "-l",
            str(log),
            *options,
        )


class PrivateRabbitMQ:
    """A node of its own: its own name, ports, data and Erlang cookie, no plugins, and none of the
    machine's configuration (/etc/rabbitmq would put it on 5672)."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self._directory = directory
        self._process: asyncio.subprocess.Process | None = None
        config = directory / "rabbitmq.conf"
        config.write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        no_plugins = directory / "enabled_plugins"
        no_plugins.write_text("")
        no_env_file = directory / "rabbitmq-env.conf"
        no_env_file.write_text("")
        self._env = {
            **os.environ,
            "HOME": str(directory),  # where Erlang keeps the node's cookie
            "RABBITMQ_NODENAME": f"orderflow-{self.port}@localhost",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(directory / "log"),
            "RABBITMQ_CONFIG_FILE": str(config),
            "RABBITMQ_CONF_ENV_FILE": str(no_env_file),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(no_plugins),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    async def start(self) -> None:
        with (self._directory / "server.log").open("ab") as log:
            self._process = await asyncio.create_subprocess_exec(
                str(RABBITMQ_SERVER), env=self._env, stdout=log, stderr=log, start_new_session=True
            )
        await wait_for_port(self.port, START_TIMEOUT_SECONDS)

    async def stop(self) -> None:
        """SIGTERM: the server script stops the node cleanly (`rabbitmqctl stop`)."""
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_SECONDS)
        except TimeoutError:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()

    async def restart(self) -> None:
        await self.stop()
        await self.start()


def _servers_directory() -> Path:
    base = Path(tempfile.mkdtemp(prefix="orderflow-servers-"))
    base.chmod(0o755)  # the postgres user reaches its directory through this one
    return base


@asynccontextmanager
async def private_servers() -> AsyncIterator[tuple[PrivatePostgres, PrivateRabbitMQ]]:
    """A PostgreSQL and a RabbitMQ server; stopped, and their data deleted, at the end."""
    base = _servers_directory()
    async with AsyncExitStack() as exits:
        exits.callback(shutil.rmtree, base, ignore_errors=True)
        (base / "postgres").mkdir()
        (base / "rabbitmq").mkdir()
        postgres = PrivatePostgres(base / "postgres")
        await postgres.start()
        exits.push_async_callback(postgres.stop)
        rabbitmq = PrivateRabbitMQ(base / "rabbitmq")
        exits.push_async_callback(rabbitmq.stop)  # also stops a node that never opened its port
        await rabbitmq.start()
        yield postgres, rabbitmq


async def publish_until_confirmed(
    topology: broker.Topology, command: Command, patience: float = PUBLISH_PATIENCE_SECONDS
) -> None:
    """Publish as a client riding out a broker restart does: again, with the same command id (so
    one effect), until the broker confirms it; TimeoutError after `patience` seconds. The robust
    connection reconnects meanwhile."""
    async with asyncio.timeout(patience):
        while True:
            try:
                async with asyncio.timeout(PUBLISH_ATTEMPT_SECONDS):
                    await broker.publish_command(topology, command)
                return
            except (TimeoutError, *CONNECTION_EXCEPTIONS):
                await asyncio.sleep(PUBLISH_RETRY_SECONDS)
