"""`make run` (`python -m devstack`): the whole system on this machine, its data in .run/, until
Ctrl-C; a PostgreSQL or RabbitMQ that it cannot have is one line on stderr and exit code 1."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from devstack.dependencies import local_dependencies
from devstack.servers import ServerUnavailable
from devstack.stack import (
    RUN_DIR,
    TemporalDevServer,
    for_a_person,
    metrics_urls,
    running_stack,
    sign_in_help,
    with_broker_accounts,
    with_local_issuer,
    with_local_publishers,
    with_payload_keys,
)
from shared.logging import settings_or_exit
from shared.settings import Settings


async def run_until_interrupted(settings: Settings, run_dir: Path) -> int:
    """The dev server listens where ORDERFLOW_TEMPORAL_ADDRESS says (its UI 1000 ports higher,
    8233 by default) and keeps its data in `run_dir`, so orders survive a restart; so do an
    embedded PostgreSQL's and a private RabbitMQ's, when they are started (devstack/dependencies.py)."""
    port = int(settings.temporal_address.rsplit(":", 1)[1])
    codec_endpoint = f"{settings.api_url}/codec"
    temporal = TemporalDevServer(port, port + 1000, run_dir / "temporal.db", codec_endpoint=codec_endpoint)
    if "codec_cors_origins" not in settings.model_fields_set:
        settings = settings.model_copy(update={"codec_cors_origins": temporal.ui_origins()})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with local_dependencies(settings, run_dir):
        settings, accounts = await with_broker_accounts(settings, run_dir)
        async with running_stack(settings, temporal=temporal, log=sys.stdout, accounts=accounts) as stack:
            print(
                "\norderflow is running:\n"
                f"  Dashboard   {settings.api_url}/dashboard\n"
                f"  API docs    {settings.api_url}/docs\n"
                f"  Metrics     {settings.api_url}/metrics and {metrics_urls(settings)}\n"
                f"  Temporal UI http://127.0.0.1:{temporal.ui_port}  (payloads encrypted: docs/security.md)\n"
                f"  RabbitMQ    {settings.amqp_url.rsplit('@', 1)[-1]}"
                "  (exchanges orders.commands, orders.events)\n"
                f"  Processes   {', '.join(name for name in stack.pids() if name != 'temporal')}\n"
                f"{sign_in_help(settings)}"
                "  Ctrl-C stops everything.\n",
                flush=True,
            )
            stopped = asyncio.create_task(stop.wait())
            crashed = asyncio.create_task(stack.first_exit())
            done, _ = await asyncio.wait({stopped, crashed}, return_when=asyncio.FIRST_COMPLETED)
            if crashed in done:
                print(f"\n{crashed.result()} exited; stopping everything.", file=sys.stderr)
                return 1
            crashed.cancel()
    print("orderflow stopped.")
    return 0


def main() -> int:
    """`make run`, with its data in .run/. Logs are readable lines unless ORDERFLOW_LOG_JSON says
    otherwise."""
    settings = for_a_person(
        with_local_publishers(with_payload_keys(with_local_issuer(settings_or_exit("stack")), RUN_DIR))
    )
    RUN_DIR.mkdir(exist_ok=True)
    try:
        return asyncio.run(run_until_interrupted(settings, RUN_DIR))
    except ServerUnavailable as missing:
        print(f"make run: {missing}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
