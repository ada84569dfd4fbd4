"""Cargo version requirements and versions (policy rules, indicators, Cargo.lock)."""

from egress_monitor.policy.semver import Version, VersionError, VersionReq

ALLOWED: tuple[type[BaseException], ...] = (VersionError,)
DICTIONARY = (b"^", b"~", b">=", b"<", b"=", b"*", b".", b",", b"-", b"+", b"\xc2\xb2",
              "\u0663".encode(), b"9" * 4400, b"0.3.10", b"1.2.3-alpha.1")


def target(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    try:
        Version.parse(text)
    finally:
        req = VersionReq(text)
        req.matches("0.3.10")
        req.matches(text)
