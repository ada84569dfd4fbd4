"""Run a coroutine on another thread's asyncio loop and wait for it (the DNS server's and the
sinkhole's threads, asked by the owner thread to take on or give back a socket)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

TIMEOUT_S = 10.0


def call_in_loop(loop: asyncio.AbstractEventLoop | None, stop: asyncio.Event | None,
                 coro: Coroutine[Any, Any, None], what: str) -> None:
    """``coro`` run to its end on ``loop``; RuntimeError naming ``what`` (and the coroutine
    closed, never left unawaited) when that loop is not running or is stopping. Raises what
    the coroutine raised, or TimeoutError after 10 s."""
    if loop is None or stop is None or stop.is_set():
        coro.close()
        raise RuntimeError(f"the {what} is not running")
    asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=TIMEOUT_S)
