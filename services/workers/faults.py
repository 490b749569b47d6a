"""The fault injector of the contract. Every business function calls it first.

It stays exactly as specified: a third of the calls fail, a third hang far longer than any
timeout, a third pass. Unit tests may substitute it; nothing else switches it off.
"""

import asyncio
import random


async def flaky_call() -> None:
    rand_num = random.random()
    if rand_num < 0.33:
        raise RuntimeError("Forced failure for testing")
    if rand_num < 0.67:
        await asyncio.sleep(300)
