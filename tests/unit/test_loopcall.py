"""call_in_loop: waits for the coroutine on the other thread's loop; refuses, closing the
coroutine, when that loop is not running or is stopping."""

from __future__ import annotations

import asyncio
import threading
import warnings

import pytest

from egress_monitor.loopcall import call_in_loop


def test_runs_the_coroutine_on_the_other_loop_and_waits() -> None:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    try:
        seen: list[int] = []

        async def work() -> None:
            seen.append(threading.get_ident())
        call_in_loop(loop, asyncio.Event(), work(), "server")
        assert seen == [thread.ident]

        async def fails() -> None:
            raise ValueError("inside")
        with pytest.raises(ValueError, match="inside"):
            call_in_loop(loop, asyncio.Event(), fails(), "server")
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def test_a_loop_not_running_or_stopping_refuses_and_closes_the_coroutine() -> None:
    async def work() -> None:
        raise AssertionError("never run")
    stopping = asyncio.Event()
    stopping.set()
    loop = asyncio.new_event_loop()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an unawaited coroutine would warn
            cases: list[tuple[asyncio.AbstractEventLoop | None, asyncio.Event | None]] = [
                (None, asyncio.Event()), (loop, None), (loop, stopping)]
            for running_loop, stop in cases:
                with pytest.raises(RuntimeError, match="the sinkhole is not running"):
                    call_in_loop(running_loop, stop, work(), "sinkhole")
    finally:
        loop.close()
