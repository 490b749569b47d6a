"""Names of what a test session makes on the shared servers (databases, vhosts, broker users), apart
from every other session's: ORDERFLOW_TEST_ID for sessions side by side, the xdist worker within one."""

import os


def session_name(base: str, separator: str = "_") -> str:
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    return base + os.environ.get("ORDERFLOW_TEST_ID", "") + (f"{separator}{worker}" if worker else "")
