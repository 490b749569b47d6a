"""The gateway keeps the promises of its OpenAPI document, as schemathesis checks them.

Schemathesis makes requests from the gateway's document, valid and invalid, one operation after
another and in linked sequences, and sends them to a gateway process (real broker, database and
Temporal), as an operator (who may call every operation; test_authorization.py covers the other
callers). Every check it has runs on each answer: documented status codes, headers and bodies,
valid requests accepted, invalid ones rejected, `Allow` on a 405, no server errors, and requests
without the token refused.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import httpx
import hypothesis
import pytest
import schemathesis
from pydantic import StringConstraints, TypeAdapter, ValidationError
from schemathesis import AuthContext
from schemathesis.config import SchemathesisConfig
from schemathesis.core.parameters import ParameterLocation

from services.api.app import create_app
from shared.contracts import Role
from shared.json_schema import stripped_text_pattern
from shared.settings import Settings
from testsupport.amqp import own_vhost
from testsupport.gateway import bearer

if TYPE_CHECKING:  # schemathesis names the type of an OpenAPI operation's case for type checkers only
    from schemathesis.specs.openapi.schemas import OpenApiCase

# Made-up examples per operation, besides the coverage phase's boundary values (about a hundred per
# operation), and sequences of linked calls: the whole file takes about 30 s on two cores.
EXAMPLES_PER_OPERATION = 25
LINKED_SEQUENCES = 12
HYPOTHESIS_SETTINGS = hypothesis.settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,  # a real server over HTTP: the time of one request says nothing about the gateway
    database=None,  # no examples kept between runs: CI starts afresh anyway
    # Schemathesis discards drafts that end in a newline (Python's `$` also matches before one), and
    # the text patterns end in optional whitespace: a matter of generation speed, not a finding
    suppress_health_check=[hypothesis.HealthCheck.filter_too_much, hypothesis.HealthCheck.too_slow],
)

# Schemathesis reads an event stream until it ends, has sent 20 events or the request timeout has
# passed. The gateway's event streams stay open while no event comes (that is what they are for),
# so each gets a second of reading instead of the default ten.
STREAM_READING = """
[[operations]]
include-path-regex = "/stream$"
request-timeout = 1
"""
# A schema-violating body may also be too large (1001 codec payloads, say): the gateway refuses
# it with 413 before reading it, which rejects it as surely as a 422 (schemathesis' defaults plus 413)
NEGATIVE_DATA_REJECTION = """
[checks.negative_data_rejection]
expected-statuses = [
  "400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx",
]
"""

# The document the gateway serves, made without starting it (test collection needs it); the first
# test checks that the process serves this very document.
DOCUMENT = create_app(Settings()).openapi()
schema = schemathesis.openapi.from_dict(
    DOCUMENT, config=SchemathesisConfig.from_str(NEGATIVE_DATA_REJECTION + STREAM_READING)
)


@schema.auth()
class OperatorToken:
    """An operator's `Authorization` (set by the `operator` fixture) in place of the one
    schemathesis made up; a case whose headers it made invalid keeps them as made, a missing or
    malformed token among them, to see it refused. (Its own check of that looks at one mutation
    per case, and a case may have several.)"""

    authorization = ""

    def get(self, case: OpenApiCase, context: AuthContext) -> str:
        return OperatorToken.authorization

    def set(self, case: OpenApiCase, data: str, context: AuthContext) -> None:
        headers = case.meta.components.get(ParameterLocation.HEADER) if case.meta else None
        if headers is None or headers.mode.is_positive:
            case.headers["Authorization"] = data


@pytest.fixture(scope="module")
def operator(settings: Settings) -> str:
    """The `Authorization` of an operator, who may call every operation."""
    OperatorToken.authorization = bearer(settings, "olivia", Role.OPERATOR)["Authorization"]
    return OperatorToken.authorization


@pytest.fixture(scope="module")
def gateway_settings(settings: Settings) -> Iterator[Settings]:
    """A vhost of its own for the gateway, so the commands it publishes reach no other test."""
    with own_vhost(settings, "orderflow_contract") as contract_settings:
        yield contract_settings


@pytest.mark.parametrize(("min_length", "max_length"), [(0, 1), (0, 3), (1, 1), (1, 3)])
def test_a_stripped_text_pattern_allows_what_the_contract_accepts(min_length: int, max_length: int) -> None:
    stripped_text = TypeAdapter(
        Annotated[str, StringConstraints(strip_whitespace=True, min_length=min_length, max_length=max_length)]
    )
    pattern = re.compile(stripped_text_pattern(min_length, max_length))
    for length in range(6):
        for characters in itertools.product("a \t\n\u3000\x1c", repeat=length):
            text = "".join(characters)
            try:
                stripped_text.validate_python(text)
                accepted = True
            except ValidationError:
                accepted = False
            assert bool(pattern.search(text)) == accepted, repr(text)


def test_the_gateway_serves_the_document_under_test(gateway_url: str) -> None:
    assert httpx.get(f"{gateway_url}/openapi.json").json() == DOCUMENT


@schema.parametrize()
@HYPOTHESIS_SETTINGS
def test_every_operation_keeps_its_documented_contract(
    case: OpenApiCase, gateway_url: str, operator: str
) -> None:
    case.call_and_validate(base_url=gateway_url)  # every check schemathesis has is on by default


def test_linked_operations_keep_their_documented_contract(
    gateway_url: str, operator: str, tmp_path: Path
) -> None:
    """Sequences of requests linked by their data (an order placed, then asked for). Schemathesis's
    CLI runs them: its Python state machine discards every sequence under Hypothesis 6.170."""
    config = tmp_path / "schemathesis.toml"
    token = operator.removeprefix("Bearer ")
    config.write_text(
        f'{NEGATIVE_DATA_REJECTION}{STREAM_READING}\n[auth.openapi.bearer]\nbearer = "{token}"\n'
    )
    run = subprocess.run(
        [
            str(Path(sys.executable).parent / "schemathesis"),
            "--config-file",
            str(config),
            "run",
            f"{gateway_url}/openapi.json",
            "--checks",
            "all",
            "--phases",
            "stateful",
            "--max-examples",
            str(LINKED_SEQUENCES),
        ],
        cwd=tmp_path,  # where it keeps its Hypothesis database
        check=False,  # its report is the assertion's message
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert run.returncode == 0, run.stdout + run.stderr
