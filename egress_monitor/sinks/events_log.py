"""The JSON-lines event log: one object per line, flushed per line, appended.

A failing write is logged and counted, never raised into the verdict path: one broken sink
must not stop the daemon deciding on packets.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import IO, Any

log = logging.getLogger(__name__)
DEFAULT_EVENTS_PATH = "/var/log/egress-monitor/events.jsonl"


class EventLog:
    """Writes event records to a file (created 0640, parent made 0750) or to stdout (``-``)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.failures = 0
        self._file: IO[str]
        if path == "-":
            self._file = sys.stdout
        else:
            os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o750, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            self._file = os.fdopen(fd, "a", buffering=1, encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        """Append one record; errors are logged and counted in ``failures``."""
        try:
            self._file.write(json.dumps(record, separators=(",", ":"), sort_keys=False) + "\n")
            self._file.flush()
        except (OSError, ValueError) as exc:
            self.failures += 1
            log.error("event log %s: %s", self.path, exc)

    def close(self) -> None:
        """Close the file (stdout is left open)."""
        if self._file is not sys.stdout:
            self._file.close()
