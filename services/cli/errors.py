"""Errors the CLI reports as one message and an exit code, never as a traceback."""

from __future__ import annotations

from typing import NoReturn

import typer

from shared.reachability import Whereabouts, unreachable_reason, without_password

WATCH_TIMEOUT_EXIT_CODE = 124  # like timeout(1)
BAD_SETTING_EXIT_CODE = 2  # like a bad option: the invocation is wrong, not the system


def fail(message: str, exit_code: int = 1) -> NoReturn:
    typer.secho(f"Error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(exit_code)


def reason(error: BaseException) -> str:
    """A one-line reason for an error, even for exceptions without a message."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def unreachable(product: str, url: str, setting: str, error: BaseException) -> NoReturn:
    """A server the command needs did not answer (or refused it): where it was looked for, and why."""
    fail(unreachable_reason(Whereabouts(product, without_password(url), setting), error))
