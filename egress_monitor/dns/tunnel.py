"""Spot DNS tunnelling: data carried out in the names a build asks for (pure).

Signals, per build and parent domain, over a sliding window:

- ``long_label``: a label of more than ``long_label`` characters (tunnels fill labels to
  the 63-character limit; real hostnames rarely pass 30);
- ``high_entropy``: a label of at least ``entropy_min_len`` characters whose Shannon entropy
  is at least ``entropy_bits`` per character (base32/base64 payloads), or that is all hex
  digits with at least ``hex_bits`` (hex carries at most 4 bits a character, so a random hex
  label can fall under ``entropy_bits``); words and short CDN hashes stay below;
- ``many_unique``: more than ``unique_names`` different names under one parent;
- ``txt_null_heavy``: ``txt_queries`` or more TXT/NULL/ANY queries under one parent.

The two label signals count only once ``data_names`` distinct such names were seen under the
parent in the window: a tunnel sends many, while one long random-looking hostname (an object
store's account id, say) is a single name asked again and again. A detection is reported
once per build and parent per window. The parent domain is the last
two labels (three under a two-letter country code with a generic second level, as in
``co.uk``): an approximation of the registrable domain that needs no public-suffix list.
Names that look like data are redacted wherever they are written: see :func:`redact`.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field

NS = 1_000_000_000
_SECOND_LEVEL = frozenset({"co", "com", "net", "org", "gov", "ac", "edu"})
_DATA_QTYPES = frozenset({"TXT", "NULL", "ANY"})


def entropy(label: str) -> float:
    """Shannon entropy in bits per character."""
    if not label:
        return 0.0
    counts = Counter(label)
    n = len(label)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def parent_domain(name: str) -> str:
    """The registrable-domain approximation of a name."""
    labels = name.rstrip(".").split(".")
    if len(labels) >= 3 and len(labels[-1]) == 2 and labels[-2] in _SECOND_LEVEL:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Tunable limits; the defaults are documented in docs/dns.md."""

    long_label: int = 52
    entropy_min_len: int = 24
    entropy_bits: float = 3.5
    hex_bits: float = 3.0
    data_names: int = 3
    unique_names: int = 40
    txt_queries: int = 10
    window_s: int = 60


_HEX = frozenset("0123456789abcdef")


def _random_label(label: str, t: Thresholds) -> bool:
    if len(label) < t.entropy_min_len:
        return False
    bits = entropy(label)
    return bits >= t.entropy_bits or (set(label) <= _HEX and bits >= t.hex_bits)


def _data_label(label: str, t: Thresholds) -> bool:
    return len(label) > t.long_label or _random_label(label, t)


def data_like(name: str, t: Thresholds = Thresholds()) -> bool:
    """Whether some label of the name looks like carried data rather than a hostname."""
    return any(_data_label(label, t) for label in name.split("."))


def redact(name: str, t: Thresholds = Thresholds()) -> str:
    """The name with data-like labels cut to 8 characters and their length: never the data."""
    return ".".join(f"{label[:8]}...[{len(label)} chars]" if _data_label(label, t) else label
                    for label in name.split("."))


@dataclass(frozen=True, slots=True)
class Detection:
    """A tunnel-shaped pattern under one parent domain of one build."""

    build_id: str
    parent: str
    reasons: tuple[str, ...]
    count: int  # queries under the parent in the window
    unique_names: int
    sample: str  # a redacted example name


@dataclass(slots=True)
class _Window:
    events: deque[tuple[int, str, bool]] = field(default_factory=deque)  # (ts, name, data q)
    names: Counter[str] = field(default_factory=Counter)
    data_queries: int = 0
    long_names: set[str] = field(default_factory=set)
    random_names: set[str] = field(default_factory=set)
    reported_until: int = 0

    def add(self, ts: int, name: str, data_query: bool) -> None:
        self.events.append((ts, name, data_query))
        self.names[name] += 1
        self.data_queries += data_query

    def trim(self, horizon: int) -> None:
        while self.events and self.events[0][0] < horizon:
            _, name, data_query = self.events.popleft()
            self.data_queries -= data_query
            self.names[name] -= 1
            if not self.names[name]:
                del self.names[name]
                self.long_names.discard(name)
                self.random_names.discard(name)


class TunnelDetector:
    """Feed it every query of every build; it returns a Detection when a pattern appears."""

    def __init__(self, thresholds: Thresholds = Thresholds(), max_parents: int = 10_000) -> None:
        self.t = thresholds
        self._windows: dict[tuple[str, str], _Window] = {}
        self._max = max_parents

    def observe(self, build_id: str, name: str, qtype: str, now_ns: int) -> Detection | None:
        """Account one query; a Detection at most once per build, parent and window."""
        parent = parent_domain(name)
        key = (build_id, parent)
        window = self._windows.get(key)
        if window is None:
            if len(self._windows) >= self._max:
                self._evict(now_ns)
            window = self._windows[key] = _Window()
        window.add(now_ns, name, qtype in _DATA_QTYPES)
        window.trim(now_ns - self.t.window_s * NS)
        labels = name.split(".")
        if any(len(label) > self.t.long_label for label in labels):
            window.long_names.add(name)
        if any(_random_label(label, self.t) for label in labels):
            window.random_names.add(name)
        reasons = []
        if len(window.long_names) >= self.t.data_names:
            reasons.append("long_label")
        if len(window.random_names) >= self.t.data_names:
            reasons.append("high_entropy")
        if len(window.names) > self.t.unique_names:
            reasons.append("many_unique")
        if window.data_queries >= self.t.txt_queries:
            reasons.append("txt_null_heavy")
        if not reasons or now_ns < window.reported_until:
            return None
        window.reported_until = now_ns + self.t.window_s * NS
        return Detection(build_id=build_id, parent=parent, reasons=tuple(reasons),
                         count=len(window.events), unique_names=len(window.names),
                         sample=redact(name, self.t))

    def forget_build(self, build_id: str) -> None:
        """Drop a finished build's windows."""
        for key in [k for k in self._windows if k[0] == build_id]:
            del self._windows[key]

    def _evict(self, now_ns: int) -> None:
        horizon = now_ns - self.t.window_s * NS
        for key in [k for k, w in self._windows.items()
                    if not w.events or w.events[-1][0] < horizon]:
            del self._windows[key]
        while len(self._windows) >= self._max:
            del self._windows[next(iter(self._windows))]
