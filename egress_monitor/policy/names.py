"""Hostname patterns of the policy language (pure).

``crates.io`` matches that name only; ``*.crates.io`` matches any name *below* ``crates.io``
at any depth (``index.crates.io``, ``a.b.crates.io``) and not ``crates.io`` itself. Names
compare in lower case without the trailing dot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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
