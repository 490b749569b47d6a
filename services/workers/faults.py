"""The contract's fault injector, called first by every business function, exactly as specified: a
third of the calls fail, a third hang far longer than any timeout. Only unit tests substitute it."""

import asyncio
import random


async def flaky_call() -> None:
    rand_num = random.random()
    if rand_num < 0.33:
        raise RuntimeError("Forced failure for testing")
    if rand_num < 0.67:
        await asyncio.sleep(300)
