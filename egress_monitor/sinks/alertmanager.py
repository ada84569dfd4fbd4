"""Deliver alerts straight to Alertmanager's v2 API, off the verdict path.

``submit`` only puts a record on a bounded queue (a full queue drops and counts: the verdict
path never waits). A thread turns records into Alertmanager alerts, skips one whose labels were
sent within ``dedup_s``, and POSTs to every URL; a URL that fails is retried with exponential
backoff (1 s doubling to 60 s) until it answers, so alerts raised while Alertmanager restarts
arrive once it is back. Failed attempts are counted.

Labels an on-call can route on: ``alertname`` (``EgressMonitor`` + the kind), ``severity``,
``runner``, ``kind``, ``role``, ``crate``, ``build``. Annotations carry the one-line summary and
the process, lineage and destination, never a secret's value (records never hold one).
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

log = logging.getLogger(__name__)
BACKOFF_MAX_S = 60.0


def _camel(kind: str) -> str:
    return "".join(part.capitalize() for part in kind.replace("-", "_").split("_"))


def summary(record: dict[str, Any]) -> str:
    """One line an on-call reads first."""
    crate = record.get("crate") or {}
    who = f"{record.get('role', '?')} of {crate.get('name')} {crate.get('version') or ''}" \
        .strip() if crate else str(record.get("role", "?"))
    ev = record.get("evidence") or {}
    dst = ev.get("dst") or record.get("dst") or {}
    where = ""
    if dst:
        names = ",".join(dst.get("names") or [])
        where = f" to {dst.get('ip')}:{dst.get('port')}" + (f" ({names})" if names else "")
    kind = record.get("kind") or record["type"]
    if kind == "dns_tunnel":
        found = record.get("evidence") or record
        return f"{who}: DNS tunnel-shaped queries under {found.get('parent')} " \
               f"({found.get('count')} queries, {', '.join(found.get('reasons', []))})"
    if kind == "known_bad_crate":
        return f"build ran the build script of known-bad crate {ev.get('crate')} " \
               f"{ev.get('version')}: {ev.get('why')}" + \
               (" (build killed)" if ev.get("build_killed") else "")
    if kind == "blocked_attempt":
        what = ""
        if ev.get("method"):
            size = ev.get("content_length")
            amount = "" if not size else f" {size} bytes" if size < 1000 else \
                f" {size / 1000:.1f} kB"
            what = f" to {ev['method']}{amount}"
            if ev.get("secret_names"):
                what += f" containing {', '.join(ev['secret_names'])}"
        elif ev.get("sni"):
            what = f" TLS to {ev['sni']}"
        return f"blocked: {who} tried{what}{where}, refused by rule {record.get('rule')}"
    return f"{kind}: {who}{where} (rule {record.get('rule')})"


def to_alert(record: dict[str, Any], runner: str, now: datetime) -> dict[str, Any]:
    """An Alertmanager v2 alert for one alert-like record."""
    kind = record.get("kind") or record["type"]
    crate = record.get("crate") or {}
    labels = {
        "alertname": f"EgressMonitor{_camel(kind)}",
        "severity": record.get("severity", "warning"),
        "runner": runner,
        "kind": kind,
        "role": str(record.get("role", "other")),
        "crate": str(crate.get("name") or ""),
        "build": str((record.get("build") or {}).get("id", "")),
    }
    lineage = " -> ".join(f"{s.get('exe')}[{s.get('pid')}]" for s in record.get("lineage", []))
    annotations = {
        "summary": summary(record),
        "process": json.dumps(record.get("process")),
        "lineage": lineage,
        "workspace": str((record.get("build") or {}).get("cwd") or ""),
        "evidence": json.dumps(record.get("evidence") or record.get("dst") or {}),
    }
    return {"labels": labels, "annotations": annotations,
            "startsAt": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "endsAt": (now + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}


class AlertmanagerSink:
    """A delivery thread; ``on_failure`` and ``on_drop`` count for the metrics."""

    def __init__(self, urls: list[str], runner: str, *, dedup_s: float = 600.0,
                 timeout_s: float = 2.0, max_queue: int = 10_000,
                 on_failure: Callable[[], None] = lambda: None,
                 on_drop: Callable[[], None] = lambda: None) -> None:
        self.urls = [u.rstrip("/") + "/api/v2/alerts" for u in urls]
        self.runner = runner
        self.dedup_s = dedup_s
        self.timeout_s = timeout_s
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=max_queue)
        self._on_failure = on_failure
        self._on_drop = on_drop
        self._sent: dict[tuple[tuple[str, str], ...], float] = {}
        self._pending: dict[str, list[dict[str, Any]]] = {u: [] for u in self.urls}
        self._retry_at: dict[str, float] = dict.fromkeys(self.urls, 0.0)
        self._backoff: dict[str, float] = dict.fromkeys(self.urls, 1.0)
        self._thread = threading.Thread(target=self._run, name="alertmanager", daemon=True)

    def start(self) -> None:
        """Start delivering."""
        self._thread.start()

    def stop(self, drain_s: float = 2.0) -> None:
        """Try to deliver what is queued for up to ``drain_s``, then end the thread."""
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=drain_s)
        self._thread.join(timeout=drain_s + self.timeout_s)

    def submit(self, record: dict[str, Any]) -> None:
        """Queue a record for delivery; never blocks."""
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._on_drop()

    def _run(self) -> None:
        stopping = False
        while True:
            # Wake often while something waits for a retry, rarely when idle.
            timeout = 0.5 if any(self._pending.values()) else 5.0
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                pass
            else:
                if item is None:
                    stopping = True
                else:
                    self._add(item)
            self._flush()
            if stopping and self._queue.empty():
                return

    def _add(self, record: dict[str, Any]) -> None:
        alert = to_alert(record, self.runner, datetime.now(UTC))
        key = tuple(sorted(alert["labels"].items()))
        now = time.monotonic()
        if now - self._sent.get(key, -1e18) < self.dedup_s:
            return
        self._sent[key] = now
        if len(self._sent) > 50_000:  # bounded: forget the oldest
            for old in sorted(self._sent, key=self._sent.__getitem__)[:10_000]:
                del self._sent[old]
        for url in self.urls:
            self._pending[url].append(alert)

    def _flush(self) -> None:
        now = time.monotonic()
        for url, alerts in self._pending.items():
            if not alerts or now < self._retry_at[url]:
                continue
            body = json.dumps(alerts[:500]).encode()
            req = urllib.request.Request(url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    resp.read()
            except (urllib.error.URLError, OSError, ValueError) as exc:
                self._on_failure()
                self._retry_at[url] = now + self._backoff[url]
                log.warning("Alertmanager %s: %s; retrying in %.0f s", url, exc,
                            self._backoff[url])
                self._backoff[url] = min(self._backoff[url] * 2, BACKOFF_MAX_S)
                continue
            del alerts[:500]
            self._backoff[url] = 1.0
