"""The values of a build's secrets, found by fingerprint wherever a build sends them (pure).

At a build process's exec the daemon reads its environment once and keeps, for each variable
that looks like a secret (:func:`select`), the value's fingerprints: the value itself and its
common encodings (URL encoding is undone on the data instead; base64 and base64url at each of
the three alignments a value can take inside a longer encoded text; lower-case hex; base32 at
each of its five alignments, as DNS tunnels use it). :meth:`SecretMatcher.find` says which
variables' values a piece of data carries and how they were encoded; :meth:`SecretMatcher.scrub`
replaces them in text about to be written. The values live in the matcher's memory only: its
``repr`` shows names and counts, nothing else ever copies them out.

Bounds: at most ``MAX_SECRETS`` values per matcher; a value longer than ``WINDOW * 2`` bytes
is fingerprinted by up to ``MAX_WINDOWS`` windows of ``WINDOW`` bytes spread over it, none at
its very start (the start of a PEM key or a JWT is the same for every key), so any part of it
a few windows long is found; data is examined up to ``MAX_DATA`` bytes. ``find`` looks up one
short gram every ``STRIDE`` bytes of each view of the data, so its cost hardly depends on the
number of secrets (see :func:`_search` and docs/benchmarks.md).
"""

from __future__ import annotations

import base64
import functools
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes

from egress_monitor.detect.http import KNOWN_NAMES

MAX_SECRETS = 256
MAX_DATA = 16384
WINDOW = 64
MAX_WINDOWS = 8
MIN_NAMED = 8  # a variable named like a secret, with a value at least this long
MIN_ENTROPIC = 20  # any other variable whose value looks generated, at least this long
MIN_NEEDLE = 12
GRAM = 6
STRIDE = MIN_NEEDLE - GRAM + 1

_SECRET_NAME = re.compile(r"(?i)(SECRET|TOKEN|PASSWORD|PASSWD|API_?KEY|ACCESS_KEY|PRIVATE_KEY"
                          r"|CREDENTIAL|AUTH|_PAT$|_KEY$|WEBHOOK|COOKIE|SESSION)")
# Long, varied values that are never secrets: paths, flags, terminal settings, build facts.
NOT_SECRETS = frozenset({"PATH", "HOME", "PWD", "OLDPWD", "SHELL", "TERM", "LS_COLORS",
                         "LANG", "MANPATH", "INFOPATH", "XDG_DATA_DIRS", "XDG_CONFIG_DIRS",
                         "PYTHONPATH", "LD_LIBRARY_PATH", "RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS",
                         "RUSTDOCFLAGS", "CFLAGS", "CXXFLAGS", "LDFLAGS", "OUT_DIR",
                         "CARGO_MANIFEST_DIR", "CARGO_TARGET_DIR", "CARGO_HOME", "RUSTUP_HOME",
                         "CARGO_PKG_NAME", "CARGO_PKG_VERSION", "CARGO_PKG_AUTHORS",
                         "CARGO_PKG_DESCRIPTION", "DBUS_SESSION_BUS_ADDRESS", "SSH_AUTH_SOCK",
                         "XDG_SESSION_ID", "XDG_SESSION_TYPE", "XDG_SESSION_CLASS",
                         "SESSION_MANAGER", "XAUTHORITY", "GOOGLE_APPLICATION_CREDENTIALS",
                         "AWS_SHARED_CREDENTIALS_FILE", "INVOCATION_ID", "JOURNAL_STREAM",
                         # what rustup and cargo set for builds (a toolchain name looks
                         # generated: stable-x86_64-unknown-linux-gnu)
                         "RUSTUP_TOOLCHAIN", "CARGO", "RUSTC", "RUSTDOC", "RUSTC_WRAPPER",
                         "RUSTC_WORKSPACE_WRAPPER", "RUSTC_LINKER", "TARGET", "HOST",
                         "PROFILE", "CARGO_MANIFEST_PATH", "CARGO_PKG_REPOSITORY",
                         "CARGO_PKG_HOMEPAGE", "CARGO_CRATE_NAME", "CARGO_BIN_NAME"})
# Variables whose names say "credential" (the generic shape is _SECRET_NAME).
KNOWN_SECRETS = (*(n for n in KNOWN_NAMES if n not in NOT_SECRETS), "CODECOV_TOKEN",
                 "SLACK_WEBHOOK_URL")
_TOKEN_ALPHABET = re.compile(rb"[A-Za-z0-9+/=_.~:-]+")


@dataclass(frozen=True, slots=True)
class SecretRules:
    """Which environment variables are secrets (configurable; these are the defaults).

    ``names`` are extra exact names; ``ignore`` are names never treated as secrets.
    """

    names: frozenset[str] = frozenset()
    ignore: frozenset[str] = NOT_SECRETS
    min_named: int = MIN_NAMED
    min_entropic: int = MIN_ENTROPIC
    entropy_bits: float = 3.5

    def is_secret(self, name: str, value: bytes) -> bool:
        """Whether the variable ``name=value`` holds a secret."""
        if name in self.ignore or not value:
            return False
        if name in self.names or name in KNOWN_SECRETS or _SECRET_NAME.search(name):
            return len(value) >= self.min_named
        return len(value) >= self.min_entropic and self._generated(value)

    def _generated(self, value: bytes) -> bool:
        if not _TOKEN_ALPHABET.fullmatch(value) or value.count(b"/") > 2 or b"::" in value:
            return False
        classes = (any(65 <= c <= 90 for c in value) + any(97 <= c <= 122 for c in value)
                   + any(48 <= c <= 57 for c in value))
        counts = Counter(value)
        bits = -sum(n / len(value) * math.log2(n / len(value)) for n in counts.values())
        return classes >= 2 and bits >= self.entropy_bits


DEFAULT_RULES = SecretRules()


@functools.lru_cache(maxsize=16)
def rules_for(names: frozenset[str], ignore: frozenset[str]) -> SecretRules:
    """The default rules with a policy's extra secret names and extra ignored names."""
    return SecretRules(names=names, ignore=NOT_SECRETS | ignore)


def select(environ: bytes, rules: SecretRules = DEFAULT_RULES) -> dict[str, bytes]:
    """The secret variables of a raw ``/proc/PID/environ`` (NUL-separated ``NAME=value``)."""
    found: dict[str, bytes] = {}
    for item in environ.split(b"\0"):
        name_b, eq, value = item.partition(b"=")
        if not eq or not name_b:
            continue
        name = name_b.decode("ascii", "replace")[:128]
        if rules.is_secret(name, value):
            found[name] = value
            if len(found) >= MAX_SECRETS:
                break
    return found


MAX_FILE = 64 << 10  # what is read of a credential file, to fingerprint its values
MAX_FILE_SECRETS = 64
_FILE_SPLIT = re.compile(rb"[\s=:,;\"'<>()\[\]{}@]+")
_AFTER = frozenset({b"password", b"passwd", b"secret", b"token", b"key"})


def file_secrets(label: str, content: bytes, rules: SecretRules = DEFAULT_RULES
                 ) -> dict[str, bytes]:
    """The values in a credential file's first ``MAX_FILE`` bytes worth fingerprinting, named
    ``file <label>`` (``label`` is the path under the build's home; several values of one
    file get ``#2``, ``#3``...). Pure and total.

    A value is a word that looks generated (the same test as an unnamed variable's: an AWS
    secret key, a token), each line of a PEM key's body, or any word of at least
    ``min_named`` bytes after ``password``, ``secret``, ``token`` or ``key`` (a .netrc
    password, an INI ``secret = ...``). Words are split at blanks and ``= : , ; " ' @``
    and brackets, so a ``user:token@host`` URL gives its token.
    """
    head = content[:MAX_FILE]
    values: list[bytes] = []
    inside = False
    for line in head.splitlines():  # a PEM key's body: every line of it is key material
        line = line.strip()
        if line.startswith(b"-----BEGIN ") or line.startswith(b"-----END "):
            inside = line.startswith(b"-----BEGIN ")
        elif inside and len(line) >= MIN_NEEDLE and b":" not in line and line not in values:
            values.append(line)
        if len(values) >= MAX_FILE_SECRETS // 2:
            break
    words = [w for w in _FILE_SPLIT.split(head) if w and not w.startswith(b"-----")]
    for i, word in enumerate(words):
        named = i > 0 and words[i - 1].lower().rstrip(b"_").split(b"_")[-1] in _AFTER
        # "_" is a neutral name: only the value's own shape counts.
        wanted = (named and len(word) >= rules.min_named) or rules.is_secret("_", word)
        if wanted and word not in values:
            values.append(word)
        if len(values) >= MAX_FILE_SECRETS:
            break
    return {f"file {label}" + (f"#{n}" if n > 1 else ""): v
            for n, v in enumerate(values, start=1)}


def _b64_cores(value: bytes) -> list[bytes]:
    """The base64 characters that depend on ``value`` alone, at each alignment."""
    cores = []
    for pad in range(3):
        enc = base64.b64encode(b"\0" * pad + value)
        core = enc[4 if pad else 0:4 * ((pad + len(value)) // 3)]
        cores.append(core)
    return cores


def _b32_cores(value: bytes) -> list[bytes]:
    cores = []
    for pad in range(5):
        enc = base64.b32encode(b"\0" * pad + value).lower()
        cores.append(enc[8 if pad else 0:8 * ((pad + len(value)) // 5)])
    return cores


def fingerprints(value: bytes) -> list[tuple[str, bytes, bool]]:
    """(encoding, needle, matched case-insensitively) for one value."""
    windows = [value]
    if len(value) > 2 * WINDOW:
        count = min(MAX_WINDOWS, len(value) // WINDOW)
        step = (len(value) - WINDOW) / count
        windows = [value[int(step * (i + 0.5)):int(step * (i + 0.5)) + WINDOW]
                   for i in range(count)]
    out: list[tuple[str, bytes, bool]] = []
    for w in windows:
        out.append(("raw", w, False))
        out.append(("raw", w.lower(), True))
        for core in _b64_cores(w):
            out.append(("base64", core, False))
            out.append(("base64url", core.translate(_URLSAFE), False))
        out.append(("hex", w.hex().encode(), True))
        out.extend(("base32", core, True) for core in _b32_cores(w))
    seen: set[tuple[bytes, bool]] = set()
    unique = []
    for enc, needle, folded in out:
        if len(needle) >= MIN_NEEDLE and (needle, folded) not in seen:
            seen.add((needle, folded))
            unique.append((enc, needle, folded))
    return unique


_URLSAFE = bytes.maketrans(b"+/", b"-_")


@dataclass(frozen=True, slots=True)
class SecretHit:
    """Which variables' values were found, and in which encodings (names only)."""

    names: tuple[str, ...]
    encodings: tuple[str, ...]


@dataclass(slots=True)
class SecretMatcher:
    """The fingerprints of one build's secrets. Values are held here and nowhere else."""

    _exact: list[tuple[bytes, str, str]] = field(default_factory=list)
    _folded: list[tuple[bytes, str, str]] = field(default_factory=list)
    # gram -> (offset in the needle, index in _exact / _folded): see _search
    _exact_grams: dict[bytes, list[tuple[int, int]]] = field(default_factory=dict)
    _folded_grams: dict[bytes, list[tuple[int, int]]] = field(default_factory=dict)
    _values: dict[str, bytes] = field(default_factory=dict)
    _environs: set[int] = field(default_factory=set)

    def __repr__(self) -> str:
        return f"SecretMatcher(names={sorted(self._values)!r})"

    @property
    def names(self) -> tuple[str, ...]:
        """The variables fingerprinted so far."""
        return tuple(self._values)

    def seen_environ(self, environ: bytes) -> bool:
        """Whether this exact environment was already read (rustc after rustc inherits
        cargo's): the caller can skip the selection. Records it otherwise."""
        key = hash(environ)
        if key in self._environs:
            return True
        if len(self._environs) < 4096:
            self._environs.add(key)
        return False

    def add(self, secrets: Mapping[str, bytes]) -> None:
        """Fingerprint more variables (a value already held under that name is skipped)."""
        for name, value in secrets.items():
            if self._values.get(name) == value or len(self._values) >= MAX_SECRETS:
                continue
            self._values[name] = value
            for enc, needle, folded in fingerprints(value):
                table = self._folded if folded else self._exact
                grams = self._folded_grams if folded else self._exact_grams
                for offset in range(STRIDE):
                    grams.setdefault(needle[offset:offset + GRAM], []).append(
                        (offset, len(table)))
                table.append((needle, name, enc))

    def find(self, data: bytes) -> SecretHit | None:
        """The secrets ``data`` carries, raw, URL-encoded or in one of the encodings."""
        if not self._values or not data:
            return None
        data = data[:MAX_DATA]
        views = [data]
        if b"%" in data:
            views.append(unquote_to_bytes(data))
        names: dict[str, None] = {}
        encs: dict[str, None] = {}
        for view in views:
            prefix = "url+" if view is not data else ""
            for _needle, name, enc in _search(view, self._exact, self._exact_grams):
                names[name] = None
                encs[prefix + enc] = None
            for _needle, name, enc in _search(view.lower(), self._folded, self._folded_grams):
                names[name] = None
                encs[prefix + enc] = None
        if not names:
            return None
        return SecretHit(tuple(sorted(names)), tuple(sorted(encs)))

    def scrub(self, text: str) -> str:
        """``text`` with every fingerprint of a held value replaced by ``[secret NAME]``."""
        if not self._values or not text:
            return text
        raw = text.encode("utf-8", "surrogatepass")
        if self.find(raw) is None:
            return text
        for needle, name, _enc in self._exact:
            raw = raw.replace(needle, f"[secret {name}]".encode())
        for needle, name, _enc in self._folded:
            # A literal replacement: the name is the build's, and may hold backslashes.
            parts = re.split(re.escape(needle), raw, flags=re.I)
            raw = f"[secret {name}]".encode().join(parts)
        out = raw.decode("utf-8", "replace")
        # Whatever is left (a value split by percent-escapes) goes whole.
        return out if self.find(out.encode("utf-8", "surrogatepass")) is None \
            else f"[secret {','.join(self.find_names(out))}]"

    def find_names(self, text: str) -> tuple[str, ...]:
        """The names found in ``text`` (empty when none)."""
        hit = self.find(text.encode("utf-8", "surrogatepass"))
        return hit.names if hit else ()


def _search(view: bytes, table: list[tuple[bytes, str, str]],
            grams: dict[bytes, list[tuple[int, int]]]) -> Iterable[tuple[bytes, str, str]]:
    """The needles of ``table`` that occur in ``view``, in one pass whatever their number.

    Every needle is at least ``MIN_NEEDLE`` bytes long, and each of its first ``STRIDE``
    ``GRAM``-byte substrings is indexed by its offset. Any occurrence of a needle covers
    ``STRIDE`` consecutive positions of the view at which one of those grams starts, one of
    which is a multiple of ``STRIDE``: looking up only those positions finds every
    occurrence, and each candidate is confirmed by comparing the whole needle.
    """
    if not table:
        return
    found: set[int] = set()
    for pos in range(0, len(view) - GRAM + 1, STRIDE):
        for offset, index in grams.get(view[pos:pos + GRAM], ()):
            start = pos - offset
            if index not in found and start >= 0 and view.startswith(table[index][0], start):
                found.add(index)
                yield table[index]


def scrub_record(record: dict[str, object], matcher: SecretMatcher) -> dict[str, object]:
    """The record itself when none of its strings carries a held value (one search over
    them all), else a copy with every string scrubbed (keys included)."""
    if not matcher.names:
        return record
    joined = "\0".join(strings(record)).encode("utf-8", "surrogatepass")
    if matcher.find(joined) is None:
        return record
    out = _scrub(record, matcher)
    assert isinstance(out, dict)
    return out


def _scrub(value: object, matcher: SecretMatcher) -> object:
    if isinstance(value, str):
        return matcher.scrub(value)
    if isinstance(value, dict):
        return {_scrub(k, matcher): _scrub(v, matcher) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v, matcher) for v in value]
    return value


def strings(record: object) -> Iterable[str]:
    """Every string in a JSON-like record (keys included)."""
    if isinstance(record, str):
        yield record
    elif isinstance(record, dict):
        for k, v in record.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(record, list | tuple):
        for v in record:
            yield from strings(v)
