"""Which names a build may resolve: the policy hook of the DNS guard (pure).

Patterns: ``crates.io`` matches that name only; ``*.crates.io`` matches any name *below*
``crates.io`` at any depth (``index.crates.io``, ``a.b.crates.io``) and not ``crates.io``
itself. Names compare in lower case without the trailing dot. The full per-role, per-crate
policy language will decide through this same interface.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")


class NamePatternError(ValueError):
    """A hostname pattern that cannot be used."""


@dataclass(frozen=True, slots=True)
class NamePattern:
    """``name`` or ``*.name``."""

    text: str
    base: str
    wildcard: bool

    @classmethod
    def parse(cls, text: str) -> NamePattern:
        """Validate a pattern; raises NamePatternError saying what is wrong."""
        raw = text.strip().lower().rstrip(".")
        wildcard = raw.startswith("*.")
        base = raw[2:] if wildcard else raw
        if not base:
            raise NamePatternError(f"'{text}' names nothing")
        if "*" in base:
            raise NamePatternError(f"'{text}': a wildcard may only be the first label, as "
                                   "'*.example.com'")
        if len(base) > 253:
            raise NamePatternError(f"'{text}' is longer than 253 characters")
        for label in base.split("."):
            if not _LABEL.match(label):
                raise NamePatternError(f"'{text}': '{label}' is not a valid DNS label")
        return cls(text=text, base=base, wildcard=wildcard)

    def matches(self, name: str) -> bool:
        """Whether the (lower-case, dot-less) name falls under this pattern."""
        if self.wildcard:
            return name.endswith("." + self.base)
        return name == self.base


@dataclass(frozen=True, slots=True)
class NameDecision:
    """The answer of a name policy: allowed or not, and which rule said so."""

    allowed: bool
    rule: str


class NamePolicy(Protocol):
    """Decides whether a build process may resolve a name."""

    def decide(self, name: str, qtype: str, role: str, crate: str | None) -> NameDecision:
        """The decision for one query."""
        ...


class AllowAllNames:
    """Every name may be resolved (no ``dns`` section in the policy)."""

    def decide(self, name: str, qtype: str, role: str, crate: str | None) -> NameDecision:
        return NameDecision(True, "dns-allow-all")


class NameAllowList:
    """Only names matching one of the patterns may be resolved, whoever asks."""

    def __init__(self, patterns: Iterable[NamePattern]) -> None:
        self.patterns = tuple(patterns)

    def decide(self, name: str, qtype: str, role: str, crate: str | None) -> NameDecision:
        for pattern in self.patterns:
            if pattern.matches(name):
                return NameDecision(True, f"dns.allow:{pattern.text}")
        return NameDecision(False, "dns.allow:no-match")


ALLOW_ALL = AllowAllNames()
