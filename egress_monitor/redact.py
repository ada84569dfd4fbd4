"""Keep the shape of what a build wrote and drop the values that may be secrets (pure).

Everything here is applied before a record is written anywhere (events log, Alertmanager,
the status view). Three structural rules need no knowledge of the secrets:

- a request target keeps its path and the *names* of its query parameters; values, the
  fragment and any ``user:password@`` are dropped (:func:`target`);
- headers are reported by name only (the HTTP parser never copies their values out);
- argv keeps its shape with secret-looking values masked (:func:`argv`): ``--token=...``,
  the value after ``--password``, ``NAME=value`` for secret-looking names, header values
  after ``-H``, credentials and query values inside URLs, and long high-entropy words.

The fourth rule, in :mod:`egress_monitor.detect.secrets`, replaces the values of the build's
own secret variables wherever they appear in any field.
Every function is total: any string gives a string, in time linear in its length.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable

MASK = "***"
MAX_QUERY_NAMES = 32
MAX_NAME = 64
# Option and variable names whose value is a credential.
_SECRET_WORD = re.compile(
    r"(?i)(secret|token|passw(or)?d|passwd|\bpass\b|api[-_]?key|access[-_]?key|private[-_]?key"
    r"|credential|\bauth|authorization|cookie|session|signature|\bsig\b|bearer|\bpat\b"
    r"|client[-_]?key|_key\b|-key\b)")
_OPTION = re.compile(r"^(--?[A-Za-z0-9][A-Za-z0-9_.-]{0,63})(=)(.*)$", re.S)
_ASSIGN = re.compile(r"^([A-Za-z_][A-Za-z0-9_]{0,127})=(.*)$", re.S)
_HEADER = re.compile(r"^([A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}):(.*)$", re.S)
_URL = re.compile(r"(?i)\b([a-z][a-z0-9+.-]{0,15}://)([^\s/?#@]*@)?([^\s?#]*)(\?[^\s#]*)?(#\S*)?")
_TOKENISH = re.compile(r"[A-Za-z0-9+/_~-]{20,}={0,2}")
_HEADER_FLAGS = frozenset({"-H", "--header", "--proxy-header"})
_VALUE_FLAGS = frozenset({"-u", "--user", "--proxy-user", "-b", "--cookie", "--oauth2-bearer",
                          "-d", "--data", "--data-raw", "--data-binary", "--data-urlencode",
                          "-F", "--form"})


def looks_secret_name(name: str) -> bool:
    """Whether an option, variable or header name says its value is a credential."""
    return bool(_SECRET_WORD.search(name))


def high_entropy(word: str) -> bool:
    """A long token-alphabet word (base64, base64url, hex, ``ghp_``-style) mixing letter cases
    or digits with Shannon entropy of at least 3.5 bits a character: the shape of generated
    keys and tokens, not of words or paths (a leading ``/`` or many of them)."""
    if len(word) < 20 or not _TOKENISH.fullmatch(word) or word.startswith("/") \
            or "//" in word or word.count("/") > 3:
        return False
    classes = sum((any(c.isupper() for c in word), any(c.islower() for c in word),
                   any(c.isdigit() for c in word)))
    if classes < 2:
        return False
    counts = Counter(word)
    bits = -sum(n / len(word) * math.log2(n / len(word)) for n in counts.values())
    return bits >= 3.5


def query_names(query: str) -> list[str]:
    """The parameter names of a query string (without ``?``), in order, bounded."""
    names: list[str] = []
    for part in query.split("&"):
        name = part.partition("=")[0][:MAX_NAME]
        if name and name not in names:
            names.append(name)
        if len(names) >= MAX_QUERY_NAMES:
            break
    return names


def target(raw: str) -> tuple[str, list[str]]:
    """A request target as (target without query, fragment or userinfo; query names).

    ``/p5?t=v&u=w`` gives ``("/p5", ["t", "u"])``; an absolute URI keeps scheme, host and
    path; ``CONNECT``'s ``host:port`` is returned as it is.
    """
    path, _, query = raw.partition("?")
    path = path.partition("#")[0]
    scheme, sep, rest = path.partition("://")
    if sep:
        authority, slash, tail = rest.partition("/")
        path = f"{scheme}://{authority.rpartition('@')[2]}{slash}{tail}"
    return path, query_names(query.partition("#")[0])


def _url(m: re.Match[str]) -> str:
    query = m.group(4)
    kept = "?" + "&".join(f"{n}={MASK}" for n in query_names(query[1:])) if query else ""
    return m.group(1) + (f"{MASK}@" if m.group(2) else "") + m.group(3) + kept


def text(value: str) -> str:
    """Mask credentials and query values inside URLs and long high-entropy words of a free
    text (an argument, a header value)."""
    value = _URL.sub(_url, value)
    return _TOKENISH.sub(lambda m: MASK if high_entropy(m.group(0)) else m.group(0), value)


def _arg(arg: str) -> str:
    m = _OPTION.match(arg)
    if m and looks_secret_name(m.group(1)):
        return m.group(1) + "=" + MASK
    m = _ASSIGN.match(arg)
    if m and looks_secret_name(m.group(1)):
        return m.group(1) + "=" + MASK
    m = _HEADER.match(arg)
    if m and " " not in m.group(1) and m.group(2).startswith(" "):
        return m.group(1) + ": " + MASK
    return text(arg)


def argv(args: Iterable[str]) -> list[str]:
    """argv with secret-looking values masked; the number and order of arguments is kept."""
    out: list[str] = []
    previous = ""
    for arg in args:
        if previous in _HEADER_FLAGS:
            name, colon, _value = arg.partition(":")
            out.append(f"{name[:MAX_NAME]}: {MASK}" if colon else MASK)
        elif previous in _VALUE_FLAGS or (previous.startswith("-") and "=" not in previous
                                          and looks_secret_name(previous)):
            out.append(MASK)
        else:
            out.append(_arg(arg))
        previous = arg
    return out
