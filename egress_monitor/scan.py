"""``egress-monitor scan``: look for known-bad crates and files on this machine.

Reads ``Cargo.lock`` files below the given paths, and the Cargo registry cache (the
``.crate`` archives in ``registry/cache``, hashing every file inside them, and the unpacked
sources in ``registry/src``). Files are hashed as streams; nothing is executed or unpacked
to disk.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
import tomllib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from egress_monitor.iocs import Indicators

_SKIP_DIRS = frozenset({"target", ".git", "node_modules"})
_CRATE_FILE = re.compile(r"^(?P<name>.+)-(?P<version>\d+\.\d+\.\d+[^/]*?)(\.crate)?$")
MAX_FILE = 256 << 20


@dataclass(frozen=True, slots=True)
class Finding:
    """One hit: a listed crate (``kind: crate``) or a file with a listed hash (``file``)."""

    kind: str
    path: str
    name: str
    version: str | None
    why: str
    source: str

    def as_dict(self) -> dict[str, Any]:
        """For ``--json``."""
        return asdict(self)


def default_iocs() -> str | None:
    """The installed indicator list, or the one in this source tree (development)."""
    for candidate in ("/etc/egress-monitor/iocs.yaml",
                      str(Path(__file__).resolve().parents[1] / "policies" / "iocs.yaml")):
        if os.path.isfile(candidate):
            return candidate
    return None


def _sha256(stream: IO[bytes]) -> str:
    digest = hashlib.sha256()
    while chunk := stream.read(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def _lockfiles(root: str) -> Iterator[str]:
    if os.path.isfile(root):
        yield root
        return
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
        if "Cargo.lock" in files:
            yield os.path.join(dirpath, "Cargo.lock")


def scan_lockfile(path: str, ind: Indicators) -> list[Finding]:
    """Listed crates in one Cargo.lock."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: not a readable Cargo.lock ({exc})") from exc
    out = []
    for pkg in data.get("package", []):
        name, version = str(pkg.get("name", "")), pkg.get("version")
        hit = ind.crate(name, version)
        if hit:
            out.append(Finding("crate", path, name, version, hit.why, hit.source))
    return out


def _file_hit(ind: Indicators, digest: str, path: str) -> Finding | None:
    for f in ind.files:
        if f.sha256 == digest:
            return Finding("file", path, f.name or os.path.basename(path), None, f.why,
                           f.source)
    return None


def _crate_hit(ind: Indicators, path: str, base: str) -> Finding | None:
    """A listed crate named by a ``<name>-<version>[.crate]`` file or directory name."""
    m = _CRATE_FILE.match(base)
    if not m:
        return None
    hit = ind.crate(m.group("name"), m.group("version"))
    if hit is None:
        return None
    return Finding("crate", path, m.group("name"), m.group("version"), hit.why, hit.source)


def scan_registry(cargo_home: str, ind: Indicators) -> list[Finding]:
    """Listed crates and files in a Cargo home's registry cache and sources."""
    out: list[Finding] = []
    cache = os.path.join(cargo_home, "registry", "cache")
    src = os.path.join(cargo_home, "registry", "src")
    for dirpath, _dirs, files in os.walk(cache):
        for name in sorted(files):
            if not name.endswith(".crate"):
                continue
            path = os.path.join(dirpath, name)
            crate = _crate_hit(ind, path, name)
            if crate:
                out.append(crate)
            if ind.files:
                out.extend(_scan_archive(path, ind))
    if os.path.isdir(src):
        for index in sorted(os.listdir(src)):
            for crate_dir in sorted(os.listdir(os.path.join(src, index))):
                base = os.path.join(src, index, crate_dir)
                crate = _crate_hit(ind, base, crate_dir)
                if crate:
                    out.append(crate)
                if ind.files:
                    out.extend(_scan_tree(base, ind))
    return out


def _scan_archive(path: str, ind: Indicators) -> list[Finding]:
    out = []
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                if not member.isfile() or member.size > MAX_FILE:
                    continue
                stream = tar.extractfile(member)
                if stream is None:
                    continue
                hit = _file_hit(ind, _sha256(stream), f"{path}!{member.name}")
                if hit:
                    out.append(hit)
    except (OSError, tarfile.TarError):
        pass  # a damaged archive is not a finding; cargo would refuse it too
    return out


def _scan_tree(root: str, ind: Indicators) -> list[Finding]:
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            try:
                if os.path.islink(path) or os.path.getsize(path) > MAX_FILE:
                    continue
                with open(path, "rb") as f:
                    hit = _file_hit(ind, _sha256(f), path)
            except OSError:
                continue
            if hit:
                out.append(hit)
    return out


def scan(paths: list[str], cargo_home: str | None, ind: Indicators) -> list[Finding]:
    """Every finding below ``paths`` and in ``cargo_home`` (None: skip the registry)."""
    findings: list[Finding] = []
    for root in paths:
        for lock in _lockfiles(root):
            findings.extend(scan_lockfile(lock, ind))
    if cargo_home:
        findings.extend(scan_registry(cargo_home, ind))
    return findings
