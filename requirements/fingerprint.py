"""Which dependency declarations a lock was made from, so that a stale lock is refused.

`make lock` ends each lock file with the line this prints: a hash of pyproject.toml's
`dependencies` and `optional-dependencies`. `make install` and the Docker build run it with
`--check LOCK...`, which fails when pyproject.toml declares other dependencies than that lock was
made from (then run `make lock`). Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
PREFIX = "# locked from pyproject.toml's dependencies, sha256 "


def fingerprint_line(pyproject: Path = PYPROJECT) -> str:
    project = tomllib.loads(pyproject.read_text())["project"]
    declared = {
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
    }
    digest = hashlib.sha256(json.dumps(declared, sort_keys=True).encode()).hexdigest()
    return PREFIX + digest


def stale_locks(locks: list[Path], pyproject: Path = PYPROJECT) -> list[Path]:
    expected = fingerprint_line(pyproject)
    return [lock for lock in locks if expected not in lock.read_text().splitlines()]


def main(arguments: list[str]) -> int:
    if arguments[:1] != ["--check"]:
        print(fingerprint_line())
        return 0
    stale = stale_locks([Path(name) for name in arguments[1:]])
    for lock in stale:
        message = f"{lock} was not made from the dependencies pyproject.toml declares: run `make lock`"
        print(message, file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
