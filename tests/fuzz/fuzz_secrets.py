"""Fuzz target: secret selection from a raw environment, matching and scrubbing.

The first half of the input is an environment (``NAME=value`` NUL-separated), and also read as
a credential file, the second the data a build sends; every step must return for any bytes.
"""

from __future__ import annotations

from egress_monitor.detect.secrets import SecretMatcher, file_secrets, scrub_record, select

ALLOWED: tuple[type[BaseException], ...] = ()


def target(data: bytes) -> None:
    half = len(data) // 2
    matcher = SecretMatcher()
    matcher.seen_environ(data[:half])
    matcher.add(select(data[:half]))
    matcher.add(file_secrets("f", data[:half]))  # the same bytes read as a credential file
    matcher.find(data[half:])
    text = data[half:].decode("utf-8", "surrogateescape")
    matcher.scrub(text)
    scrub_record({"type": "dns", "query": {"name": text}, "argv": [text, text[:3]]}, matcher)
