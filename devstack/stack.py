"""The whole of orderflow on one machine: a Temporal dev server, the migrations, and the four
services (api, bridge, workers, audit) as child processes with their logs.

`make run` runs `python -m devstack`; the end-to-end tests and the benchmark start the same
stack through `running_stack`, so what they measure is what users run.

Bridges and workers are competing consumers (of the command and placement queues) and pollers (of
the task queues), so several of each may run: `ORDERFLOW_BRIDGE_INSTANCES` and
`ORDERFLOW_WORKER_INSTANCES` say how many. A lone instance is named after its service (`bridge`);
several are numbered (`bridge-1`, `bridge-2`), and `Stack.instances("bridge")` names them all.
Each instance serves its metrics on a port of its own: the service's `*_METRICS_PORT` for the
first, counting up from there for the others.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import quote

from pydantic import SecretStr
from pydantic_core import to_jsonable_python
from sqlalchemy.engine import make_url

from services.workers.visibility import dev_server_arguments
from shared import broker_users, connection_security, local_issuer, schema
from shared.codec import ensure_keys_file
from shared.contracts import Role
from shared.settings import Settings

SERVICES = ("api", "bridge", "workers", "audit")
INSTANCE_SEPARATOR = "-"
TEMPORAL_BINARY = Path(sys.executable).parent / "temporal"
STOP_GRACE_SECONDS = 10.0
RUN_DIR = Path(".run")  # `make run`'s data and local keys, outside git
LOCAL_PAYLOAD_KEYS_FILE = "payload-keys"
LOCAL_PAYLOAD_KEY_ID = "local-1"
LOCAL_DEFAULT_BROKER_USER = "guest"


@dataclass(frozen=True)
class TemporalDevServer:
    """Where the dev server listens and keeps its data (a file, so `make run` survives restarts)."""

    port: int = 7233
    ui_port: int = 8233
    db_file: Path | None = None  # None: in memory
    ui: bool = True
    codec_endpoint: str | None = None  # where its UI has payloads decrypted (the gateway's /codec)

    def command(self) -> list[str]:
        args = [
            str(TEMPORAL_BINARY),
            "server",
            "start-dev",
            "--ip",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--ui-port",
            str(self.ui_port),
            # the default SQLite settings cost the server two thirds of its throughput
            "--sqlite-pragma",
            "journal_mode=wal",
            "--sqlite-pragma",
            "synchronous=off",
            "--log-level",
            "error",
            *dev_server_arguments(),  # the order workflow's search attributes
        ]
        if self.db_file is not None:
            args += ["--db-filename", str(self.db_file)]
        if not self.ui:
            args.append("--headless")
        if self.codec_endpoint is not None:
            args += ["--ui-codec-endpoint", self.codec_endpoint]
        return args

    def ui_origins(self) -> list[str]:
        return [f"http://{host}:{self.ui_port}" for host in ("127.0.0.1", "localhost")]


def instance_count(settings: Settings, service: str) -> int:
    """How many processes of `service` the stack runs."""
    return {"bridge": settings.bridge_instances, "workers": settings.worker_instances}.get(service, 1)


def instance_names(service: str, count: int) -> list[str]:
    """`bridge` for one, `bridge-1`, `bridge-2`, ... for several."""
    if count == 1:
        return [service]
    return [f"{service}{INSTANCE_SEPARATOR}{number}" for number in range(1, count + 1)]


def service_of(name: str) -> str:
    """The service a process name belongs to: `bridge-2` → `bridge`, `temporal` → `temporal`."""
    service, _, number = name.rpartition(INSTANCE_SEPARATOR)
    return service if service and number.isdigit() else name


METRICS_PORT_SETTINGS = {
    "bridge": "bridge_metrics_port",
    "workers": "worker_metrics_port",
    "audit": "audit_metrics_port",
}


def metrics_ports(settings: Settings, service: str) -> list[int]:
    """The metrics port of each instance of `service`, in `instance_names` order (0: none)."""
    setting = METRICS_PORT_SETTINGS.get(service)
    first = getattr(settings, setting) if setting else 0
    return [first + number if first else 0 for number in range(instance_count(settings, service))]


def metrics_urls(settings: Settings) -> str:
    ports = [port for service in METRICS_PORT_SETTINGS for port in metrics_ports(settings, service) if port]
    return ", ".join(f"http://{settings.metrics_host}:{port}/metrics" for port in ports) or "(off)"


def check_metrics_ports(settings: Settings, services: tuple[str, ...]) -> None:
    """Refuse a stack whose instances would try to serve metrics on one port (or the API's)."""
    ports = [port for service in services for port in metrics_ports(settings, service) if port]
    if "api" in services:
        ports.append(settings.api_port)
    if len(set(ports)) != len(ports):
        raise ValueError(
            f"metrics ports overlap: {sorted(ports)}; space out the ORDERFLOW_*_METRICS_PORT settings"
        )


def instance_environment(env: dict[str, str], service: str, metrics_port: int) -> dict[str, str]:
    """`env` for one instance of `service`: with its own metrics port."""
    setting = METRICS_PORT_SETTINGS.get(service)
    return env | {f"ORDERFLOW_{setting.upper()}": str(metrics_port)} if setting else env


def service_environment(settings: Settings) -> dict[str, str]:
    """The settings as ORDERFLOW_* variables, so every child process sees the same configuration."""
    env = dict(os.environ)
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is None:  # unset: the child reads its default, None
            env.pop(f"ORDERFLOW_{name.upper()}", None)
        else:
            env[f"ORDERFLOW_{name.upper()}"] = environment_value(value)
    return env


def environment_value(value: object) -> str:
    """A setting's value as pydantic-settings reads it back: lists and mappings as JSON."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str | int | float | Path):
        return str(value)
    return json.dumps(to_jsonable_python(value))


class Stack:
    """Child processes whose output goes, line by line and prefixed with their name, to `log`."""

    def __init__(self, log: IO[str]) -> None:
        self._log = log
        self._processes: dict[str, asyncio.subprocess.Process] = {}
        self._commands: dict[str, tuple[list[str], dict[str, str]]] = {}
        self._pumps: list[asyncio.Task[None]] = []

    async def start(self, name: str, command: list[str], env: dict[str, str]) -> None:
        self._commands[name] = (command, env)
        process = await asyncio.create_subprocess_exec(
            *command,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us only; we stop the children in order
        )
        self._processes[name] = process
        self._pumps.append(asyncio.create_task(self._pump(name, process)))

    async def _pump(self, name: str, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        prefix = f"{name:<8}| "
        async for line in process.stdout:
            self._log.write(prefix + line.decode(errors="replace"))
            self._log.flush()

    async def first_exit(self) -> str:
        """Wait until any child exits; returns its name."""
        waits = {asyncio.create_task(p.wait()): name for name, p in self._processes.items()}
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        return waits[done.pop()]

    def instances(self, service: str) -> list[str]:
        """The names of the processes of `service` (`bridge`, or `bridge-1`, `bridge-2`, ...)."""
        return [name for name in self._processes if service_of(name) == service]

    async def crash_and_restart(self, name: str) -> None:
        """Kill a child without warning (SIGKILL) and start it again, as a supervisor would.
        `name` is one process (`bridge-2`) or a service (`bridge`: all of its instances)."""
        names = [name] if name in self._processes else self.instances(name)
        if not names:
            raise KeyError(f"no process or service called {name!r}")
        for each in names:
            process = self._processes[each]
            process.kill()
            await process.wait()
            await self.start(each, *self._commands[each])

    def exited(self) -> dict[str, int]:
        """The children that have ended by themselves, with their exit codes: nobody restarts
        them, so anything here is a service that crashed or gave up."""
        return {name: p.returncode for name, p in self._processes.items() if p.returncode is not None}

    def pids(self) -> dict[str, int]:
        return {name: process.pid for name, process in self._processes.items()}

    async def stop(self, names: list[str]) -> None:
        """SIGTERM, then SIGKILL whatever has not stopped within the grace period."""
        procs = [self._processes[n] for n in names if n in self._processes]
        for process in procs:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in procs:
            try:
                await asyncio.wait_for(process.wait(), STOP_GRACE_SECONDS)
            except TimeoutError:
                process.kill()
                await process.wait()

    async def close(self) -> None:
        services = [n for n in self._processes if n != "temporal"]
        await self.stop(services)
        await self.stop(["temporal"])
        await asyncio.gather(*self._pumps, return_exceptions=True)


async def wait_for_port(port: int, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if loop.time() > deadline:
                raise RuntimeError(f"nothing listens on port {port} after {timeout} s") from None
            await asyncio.sleep(0.1)


def isolated_settings(settings: Settings, name: str) -> Settings:
    """`settings` moved to a database and a RabbitMQ vhost called `name`, the vhost made anew, so
    tests and benchmarks never share queues or rows with a running `make run`. Without rabbitmqctl
    (not root, say) the vhost stays `/`."""
    ctl = shutil.which("rabbitmqctl")
    vhost = name if ctl else "/"
    if ctl:
        subprocess.run([ctl, "-q", "delete_vhost", name], check=False, capture_output=True)
        subprocess.run([ctl, "-q", "add_vhost", name], check=True, capture_output=True)
        subprocess.run(
            [ctl, "-q", "set_permissions", "-p", name, "guest", ".*", ".*", ".*"],
            check=True,
            capture_output=True,
        )
    database_url = make_url(settings.database_url).set(database=name)
    return settings.model_copy(
        update={
            "database_url": database_url.render_as_string(hide_password=False),
            "amqp_url": settings.amqp_url.rstrip("/") + "/" + quote(vhost, safe=""),
        }
    )


def drop_vhost(name: str) -> None:
    """Delete the RabbitMQ vhost `isolated_settings` made (nothing without rabbitmqctl)."""
    ctl = shutil.which("rabbitmqctl")
    if ctl:
        subprocess.run([ctl, "-q", "delete_vhost", name], check=False, capture_output=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@asynccontextmanager
async def running_stack(
    settings: Settings,
    *,
    temporal: TemporalDevServer | None,
    log: IO[str],
    services: tuple[str, ...] = SERVICES,
    code: Path | None = None,
    accounts: Mapping[str, Mapping[str, str]] | None = None,
) -> AsyncIterator[Stack]:
    """Migrate, start Temporal (unless `temporal` is None: then `settings` names a running one)
    and the services; stop them all, services first, when the block ends. `code`: a checkout
    the services run from instead of this one (the bench runs two revisions at once). `accounts`:
    each service's own broker user (ORDERFLOW_AMQP_* variables), as `make run` gives them."""
    check_metrics_ports(settings, services)
    database_url, database_ssl = (
        connection_security.database_url(settings),
        connection_security.postgres_ssl(settings),
    )
    await schema.ensure_database(database_url, database_ssl)
    await asyncio.to_thread(schema.upgrade, database_url, database_ssl)
    async with AsyncExitStack() as exits:
        stack = Stack(log)
        exits.push_async_callback(stack.close)
        if temporal is not None:
            await stack.start("temporal", temporal.command(), dict(os.environ))
            await wait_for_port(temporal.port)
        env = service_environment(settings)
        if code is not None:
            # PYTHONSAFEPATH: `python -m` would put the working directory, this checkout, first
            env |= {"PYTHONPATH": str(code), "PYTHONSAFEPATH": "1"}
        for service in services:
            names = instance_names(service, instance_count(settings, service))
            for name, metrics_port in zip(names, metrics_ports(settings, service), strict=True):
                command = [sys.executable, "-m", f"services.{service}"]
                own = instance_environment(env, service, metrics_port) | dict(
                    (accounts or {}).get(service, {})
                )
                await stack.start(name, command, own)
        if "api" in services:
            await wait_for_port(settings.api_port)
        yield stack


def for_a_person(settings: Settings) -> Settings:
    """`make run`'s settings: a person reads its logs, so readable lines (one per event, as JSON
    would be) unless ORDERFLOW_LOG_JSON was chosen; services started on their own write JSON."""
    if "log_json" in settings.model_fields_set:
        return settings
    return settings.model_copy(update={"log_json": False})


def sign_in_help(settings: Settings) -> str:
    """How to get a token, for the banner (the gateway accepts nothing without one)."""
    if not settings.auth_local_issuer:
        return f"  Sign in     with a token from {settings.auth_issuer or 'your issuer'}\n"
    return (
        "  Sign in     orderflow token --role reviewer --subject rita         a token for the CLI "
        "(--token, ORDERFLOW_TOKEN or `orderflow login`)\n"
        "              orderflow token --role reviewer --subject rita --link  a dashboard sign-in link\n"
    )


def with_local_issuer(settings: Settings) -> Settings:
    """`make run`'s identity: the local development issuer, its key created on first start (mode
    0600, in .run/), unless ORDERFLOW_AUTH_LOCAL_ISSUER=false; the services are told explicitly."""
    if not local_issuer.under_make_run(settings):
        return settings
    key_file = settings.auth_local_issuer_key_file.resolve()
    local_issuer.ensure_key(key_file)
    return settings.model_copy(update={"auth_local_issuer": True, "auth_local_issuer_key_file": key_file})


def local_payload_keys(run_dir: Path) -> Path:
    """The local payload keys file, `run_dir`/payload-keys (mode 0600), made with one key on first use."""
    keys_file = (run_dir / LOCAL_PAYLOAD_KEYS_FILE).resolve()
    ensure_keys_file(keys_file, LOCAL_PAYLOAD_KEY_ID)
    return keys_file


def with_payload_keys(settings: Settings, run_dir: Path) -> Settings:
    """`make run`'s payload keys: the local file, unless ORDERFLOW_PAYLOAD_KEYS or
    ORDERFLOW_PAYLOAD_KEYS_FILE names keys; the services are told the file."""
    if settings.payload_keys.get_secret_value() or settings.payload_keys_file is not None:
        return settings
    return settings.model_copy(update={"payload_keys_file": local_payload_keys(run_dir)})


async def with_broker_accounts(
    settings: Settings, run_dir: Path
) -> tuple[Settings, dict[str, dict[str, str]]]:
    """`make run`'s broker users: one per service, with only the permissions it needs, their
    passwords in `run_dir` (0600); the gateway's is a delegate (it names the token's subject as a
    command's issuer). Without rabbitmqctl one line says so and every service uses amqp_url's user."""
    try:
        accounts = await broker_users.set_up_accounts(settings, run_dir)
    except broker_users.CannotCreateUsers as error:
        print(
            f"one broker user for every service ({error}): run `make run` where rabbitmqctl works (as "
            "root on the broker's host) for a user per service, or see docs/security.md",
            file=sys.stderr,
        )
        return settings, {}
    gateway = broker_users.USER_PREFIX + broker_users.ACCOUNT_OF_SERVICE["api"]
    return settings.model_copy(update={"amqp_delegates": [*settings.amqp_delegates, gateway]}), accounts


def with_local_publishers(settings: Settings) -> Settings:
    """`make run`'s AMQP publishers, unless configured: the local default account keeps every role
    (so existing AMQP clients keep working, with `user_id` set) and, like the operator's account
    (whose dead-letter replays keep their commands' issuers), may name a command's issuer."""
    if "amqp_publisher_roles" in settings.model_fields_set:
        return settings
    operator = broker_users.USER_PREFIX + "operator"
    return settings.model_copy(
        update={
            "amqp_publisher_roles": {LOCAL_DEFAULT_BROKER_USER: list(Role), operator: [Role.OPERATOR]},
            "amqp_delegates": [*settings.amqp_delegates, LOCAL_DEFAULT_BROKER_USER, operator],
        }
    )
