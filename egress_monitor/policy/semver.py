"""Cargo-style version requirements (pure): ``^1.2``, ``~0.3``, ``>=0.3, <0.4``, ``=0.3.10``,
``0.3`` (caret), ``*``, ``1.*``.

Comparators are joined by commas and must all hold. As in Cargo, a pre-release version only
matches a comparator that names a pre-release of the same major.minor.patch.

Total: :meth:`Version.parse` and :class:`VersionReq` raise :class:`VersionError`, and nothing
else, for any text; numbers are ASCII digits, at most 20 of them (Cargo's are u64), and a text
longer than ``MAX_TEXT`` characters is refused before any matching.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_VERSION = re.compile(r"(\d{1,20})\.(\d{1,20})\.(\d{1,20})(?:-([0-9A-Za-z.-]+))?"
                      r"(?:\+[0-9A-Za-z.-]+)?", re.ASCII)
_COMPARATOR = re.compile(r"(=|>=|<=|>|<|~|\^)?\s*(\*|\d{1,20})(?:\.(\*|\d{1,20}))?"
                         r"(?:\.(\*|\d{1,20}))?(?:-([0-9A-Za-z.-]+))?", re.ASCII)
MAX_TEXT = 1024


class VersionError(ValueError):
    """A version or requirement that cannot be read."""


def _short(text: str) -> str:
    return text if len(text) <= 80 else text[:80] + "..."


RELEASE: tuple[tuple[int, int | str], ...] = ((2, ""),)  # sorts after every pre-release


@dataclass(frozen=True, order=True, slots=True)
class Version:
    """A semantic version; ordering follows semver (a pre-release sorts before its release,
    numeric identifiers below alphanumeric ones)."""

    major: int
    minor: int
    patch: int
    pre: tuple[tuple[int, int | str], ...] = RELEASE

    @classmethod
    def parse(cls, text: str) -> Version:
        """``1.2.3`` or ``1.2.3-alpha.1``; build metadata is ignored."""
        m = _VERSION.fullmatch(text.strip()) if len(text) <= MAX_TEXT else None
        if not m:
            raise VersionError(f"'{_short(text)}' is not a version (expected "
                               "MAJOR.MINOR.PATCH)")
        pre = RELEASE
        if m.group(4):
            parts = m.group(4).split(".")
            if any(p.isdigit() and len(p) > 20 for p in parts):
                raise VersionError(f"'{_short(text)}': a pre-release number longer than 20 "
                                   "digits")
            pre = tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)
        return cls(int(m.group(1)), int(m.group(2)), int(m.group(3)), pre)

    @property
    def is_pre(self) -> bool:
        """Whether this is a pre-release."""
        return self.pre != RELEASE


@dataclass(frozen=True, slots=True)
class _Comparator:
    low: Version | None  # inclusive lower bound
    high: Version | None  # exclusive upper bound
    named_pre: Version | None  # the pre-release a comparator names, if any


def _bounds(op: str, parts: list[int | None], pre: str | None) -> _Comparator:
    major, minor, patch = parts
    if major is None:
        return _Comparator(None, None, None)
    base = Version.parse(f"{major}.{minor or 0}.{patch or 0}" + (f"-{pre}" if pre else ""))
    named = base if pre else None

    def bump(level: int) -> Version:
        if level == 0:
            return Version(major + 1, 0, 0)
        if level == 1:
            return Version(major, (minor or 0) + 1, 0)
        return Version(major, minor or 0, (patch or 0) + 1)

    precision = 0 if minor is None else 1 if patch is None else 2
    # The version right after a pre-release (for "=" and ">" of one): one more identifier.
    after = Version(base.major, base.minor, base.patch, (*base.pre, (0, 0)))
    if op == "=":
        return _Comparator(base, after if pre else bump(precision), named)
    if op == ">=":
        return _Comparator(base, None, named)
    if op == ">":
        return _Comparator(after if pre else bump(precision), None, named)
    if op == "<":
        return _Comparator(None, base, named)
    if op == "<=":
        return _Comparator(None, bump(precision), named)
    if op == "~":
        return _Comparator(base, bump(0 if precision == 0 else 1), named)
    # caret (also the bare form): the leftmost non-zero part may not change
    if major > 0 or precision == 0:
        level = 0
    elif (minor or 0) > 0 or precision == 1:
        level = 1
    else:
        level = 2
    return _Comparator(base, bump(level), named)


class VersionReq:
    """A requirement; ``matches(version)``."""

    def __init__(self, text: str) -> None:
        self.text = text
        self._comparators: list[_Comparator] = []
        if len(text) > MAX_TEXT:
            raise VersionError(f"'{_short(text)}' is longer than {MAX_TEXT} characters")
        pieces = [p.strip() for p in text.split(",")]
        if not text.strip() or any(not p for p in pieces):
            raise VersionError(f"'{_short(text)}' is not a version requirement")
        for piece in pieces:
            m = _COMPARATOR.fullmatch(piece)
            if not m:
                raise VersionError(f"'{_short(piece)}' is not a version requirement (expected "
                                   "e.g. '^1.2', '>=0.3, <0.4', '=0.3.10' or '*')")
            op = m.group(1) or "^"
            raw = [m.group(2), m.group(3), m.group(4)]
            parts: list[int | None] = []
            wildcard = False
            for value in raw:
                if value is None or value == "*" or wildcard:
                    wildcard = wildcard or value == "*"
                    parts.append(None)
                else:
                    parts.append(int(value))
            if wildcard and op not in ("^", "="):
                raise VersionError(f"'{piece}': a wildcard cannot follow '{op}'")
            self._comparators.append(_bounds("=" if wildcard else op, parts, m.group(5)))

    def matches(self, version: str) -> bool:
        """Whether a version string satisfies every comparator (False if unreadable)."""
        try:
            v = Version.parse(version)
        except VersionError:
            return False
        for c in self._comparators:
            if c.low is not None and v < c.low:
                return False
            if c.high is not None and v >= c.high:
                return False
        if v.is_pre:
            return any(c.named_pre is not None and
                       (c.named_pre.major, c.named_pre.minor, c.named_pre.patch) ==
                       (v.major, v.minor, v.patch) for c in self._comparators)
        return True
