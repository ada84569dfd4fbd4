"""Fuzz target: the fanotify event-record decoder."""

from __future__ import annotations

from egress_monitor.sources.fanotify import decode_events

ALLOWED: tuple[type[BaseException], ...] = ()


def target(data: bytes) -> None:
    decode_events(data)
