"""The daemon's outputs: every record and alert, fanned out to the sinks, each failing alone.

Every record is first scrubbed of the values of its build's secrets (``scrub``). Events go to
the events file, to ``status``'s short lists (:mod:`egress_monitor.status`) and
to the extra sinks (the terminal's human lines). Alerts (:class:`egress_monitor.alerts.Alert`)
also go to Alertmanager and to the exfiltration metric. A sink that raises is logged (once per
sink per minute) and counted in ``egress_monitor_sink_failures_total{sink}``; the others still
get the record, and the caller never sees the failure: an output must not stop the daemon from
judging packets.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from egress_monitor import status
from egress_monitor.alerts import Alert
from egress_monitor.sinks.events_log import EventLog
from egress_monitor.sinks.metrics import Metrics

log = logging.getLogger(__name__)
LOG_EVERY_S = 60.0
RECENT = 10


class Outputs:
    """Where records go. ``alertmanager`` is anything with ``submit(record)``."""

    def __init__(self, events: EventLog, metrics: Metrics, alertmanager: Any = None,
                 clock: Callable[[], float] = time.monotonic,
                 scrub: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        self.events = events
        self._scrub = scrub or (lambda record: record)
        self.metrics = metrics
        self.alertmanager = alertmanager
        # What `status` shows (egress_monitor.status): recent alerts and enforced refusals,
        # audit's would-be refusals, finished builds; bounded.
        self.last_alerts: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self.last_would_deny: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self.last_builds: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self._clock = clock
        self._logged: dict[str, float] = {}
        self.extra: list[tuple[str, Callable[[dict[str, Any]], None]]] = []

    def emit(self, item: dict[str, Any] | Alert) -> None:
        """Write one event record, or raise one alert."""
        if isinstance(item, Alert):
            self._alert(item)
        else:
            self._write(self._scrubbed(item))

    def _scrubbed(self, record: dict[str, Any]) -> dict[str, Any]:
        """The record as every sink gets it: no value of a build's secret in it. Scrubbing
        that fails withholds the record (counted), never lets it out unscrubbed."""
        try:
            return self._scrub(record)
        except Exception:
            self._failed("scrub")
            return {"ts": record.get("ts"), "type": "withheld", "reason": "scrub failed"}

    def _alert(self, alert: Alert) -> None:
        record = self._scrubbed(alert.record())
        self._guard("metrics", lambda: self.metrics.exfil_attempts.labels(
            alert.kind, alert.role).inc())
        if self.alertmanager is not None:
            self._guard("alertmanager", lambda: self.alertmanager.submit(record))
        self._write(record)

    def _write(self, record: dict[str, Any]) -> None:
        self._guard("status", lambda: status.remember(
            record, alerts=self.last_alerts, would_deny=self.last_would_deny,
            builds=self.last_builds))
        before = self.events.failures
        self._guard("events", lambda: self.events.write(record))
        if self.events.failures != before:
            self.metrics.sink_failures.labels("events").inc()
        for name, sink in self.extra:
            self._guard(name, lambda s=sink: s(record))  # type: ignore[misc]

    def _guard(self, sink: str, call: Callable[[], object]) -> None:
        try:
            call()
        except Exception:
            self._failed(sink)

    def _failed(self, sink: str) -> None:
        """Count a failure of ``sink`` and log it (with the exception being handled), at most
        once a minute per sink."""
        self.metrics.sink_failures.labels(sink).inc()
        now = self._clock()
        if now - self._logged.get(sink, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._logged[sink] = now
            log.exception("output %s failed (logged once a minute; counted in "
                          "egress_monitor_sink_failures_total)", sink)
