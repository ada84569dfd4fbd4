"""Fuzz target: structural redaction of request targets, argv and free text."""

from __future__ import annotations

from egress_monitor import redact

ALLOWED: tuple[type[BaseException], ...] = ()


def target(data: bytes) -> None:
    text = data.decode("utf-8", "surrogateescape")
    redact.target(text)
    redact.text(text)
    redact.argv(text.split("\0"))
