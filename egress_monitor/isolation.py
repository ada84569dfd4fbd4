"""Each event handled in isolation: an unexpected exception is logged, counted, and contained.

The daemon's loop runs every queued packet, proc event, DNS query, sinkhole report, control
request, reload and periodic check through :meth:`Isolation.run`. An exception that escapes
one of them is a bug (parsers raise only their documented errors, which their callers catch):
it is logged with its traceback, at most once a minute per place (with the count of the ones
not logged), counted in ``egress_monitor_internal_errors_total{where}``, and the caller's
``fallback`` runs (for a packet: a refusing verdict). The loop goes on with the next event.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Literal, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
Where = Literal["packet", "proc_event", "dns_query", "sinkhole", "control", "reload",
                "tick", "reconcile", "uploads", "build_end", "credential", "loop"]
LOG_EVERY_S = 60.0


class Isolation:
    """Runs handlers so that one failure stays one failure."""

    def __init__(self, count: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._count = count
        self._clock = clock
        self._last_logged: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    def run(self, where: Where, handler: Callable[[], T],
            fallback: Callable[[], object] | None = None) -> T | None:
        """``handler()``; on an exception, report it, run ``fallback`` and return None."""
        try:
            return handler()
        except Exception as exc:
            self.report(where, exc)
            if fallback is not None:
                try:
                    fallback()
                except Exception as again:  # the fallback is the last line: never raise
                    self.report(where, again)
            return None

    def report(self, where: str, exc: BaseException) -> None:
        """Count one failure; log it with its traceback unless one was logged this minute."""
        self._count(where)
        now = self._clock()
        if now - self._last_logged.get(where, -LOG_EVERY_S) < LOG_EVERY_S:
            self._unlogged[where] = self._unlogged.get(where, 0) + 1
            return
        self._last_logged[where] = now
        skipped = self._unlogged.pop(where, 0)
        log.error("internal error in %s (handled in isolation; the daemon goes on%s)", where,
                  f"; {skipped} more since the last one logged" if skipped else "",
                  exc_info=exc)
