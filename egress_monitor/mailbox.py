"""Work handed to the main loop by other threads: a queue and a wake fd.

One thread owns the daemon's state (the process tree, the DNS knowledge, the exfiltration
tables, the sinks). The resolver and sinkhole threads never touch it: they :meth:`post` a
callable, which the main loop runs in :meth:`run_pending` between its other events, and get a
``concurrent.futures.Future`` for its result. The resolver awaits that future through
``asyncio.wrap_future``, so one query waiting on the main loop never holds up the others.

A job runs in isolation: an exception it raises is handed to ``on_error(where, exc)`` (which
logs and counts it) and set on its future, and the loop goes on with the next job. Jobs posted
after :meth:`close` fail at once with :class:`MailboxClosed`, and so do jobs still queued when
it is closed, so a thread waiting on a result is never left hanging at shutdown.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")
MAX_PENDING = 8192  # a thread flooding the loop is refused, never queued without bound


class MailboxClosed(RuntimeError):
    """The main loop is gone, or has too much pending work: the job was not run."""


class Mailbox:
    """A bounded, thread-safe queue of jobs for the thread that owns the state."""

    def __init__(self, on_error: Callable[[str, BaseException], None],
                 max_pending: int = MAX_PENDING) -> None:
        self._on_error = on_error
        self._max = max_pending
        self._jobs: deque[tuple[str, Callable[[], Any], Future[Any]]] = deque()
        self._guard = threading.Lock()  # guards only the deque, never the daemon's state
        self._closed = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def fileno(self) -> int:
        """Readable when jobs are waiting (for the main loop's selector)."""
        return self._wake_r.fileno()

    def post(self, where: str, job: Callable[[], T]) -> Future[T]:
        """Queue ``job`` for the main loop; ``where`` names it in error counts and logs."""
        future: Future[T] = Future()
        with self._guard:
            if self._closed or len(self._jobs) >= self._max:
                future.set_exception(MailboxClosed(
                    "the daemon is stopping" if self._closed else "too much pending work"))
                return future
            self._jobs.append((where, job, future))
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")  # a full socket buffer already means "wake up"
        return future

    def run_pending(self, limit: int = 1024, budget_s: float = 0.05) -> int:
        """Run queued jobs on the calling (owner) thread, up to ``limit`` of them or
        ``budget_s`` seconds, whichever comes first (so a flood of DNS queries cannot starve
        held packets or the watchdog); returns how many ran. The rest wait for the next pass."""
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_r.recv(4096)
        done = 0
        deadline = time.monotonic() + budget_s
        while done < limit and (done == 0 or time.monotonic() < deadline):
            with self._guard:
                if not self._jobs:
                    break
                where, job, future = self._jobs.popleft()
            done += 1
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = job()
            except BaseException as exc:  # one job never takes the loop down
                self._on_error(where, exc)
                future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
            else:
                future.set_result(result)
        with self._guard:
            more = bool(self._jobs)
        if more:  # more are waiting: make sure the selector wakes again
            with contextlib.suppress(BlockingIOError, OSError):
                self._wake_w.send(b"\0")
        return done

    def close(self) -> None:
        """Refuse new jobs and fail the queued ones; idempotent."""
        with self._guard:
            self._closed = True
            pending = list(self._jobs)
            self._jobs.clear()
        for _where, _job, future in pending:
            if future.set_running_or_notify_cancel():
                future.set_exception(MailboxClosed("the daemon is stopping"))
        self._wake_r.close()
        self._wake_w.close()
