"""``egress-monitor scan``: look for known-bad crates and files on this machine.

Below the given paths: ``Cargo.lock`` files (every package they pin), and every crate source
found as a directory (a ``Cargo.toml`` with a ``[package]``: workspace members, path
dependencies, ``cargo vendor`` trees, which also carry ``.cargo-checksum.json``), whose files
are hashed when there are file indicators. In the Cargo home: the registry cache (the
``.crate`` archives in ``registry/cache``, hashing every file inside them) and the unpacked
sources in ``registry/src``. Files are hashed as streams; nothing is executed or unpacked to
disk. The result counts what was examined, so a scan that found nothing to look at says so
instead of reporting "0 findings".
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
import tomllib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
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


@dataclass(slots=True)
class ScanResult:
    """Findings, and how much was examined: lock files, crates (each lock-file package, each
    source directory, each registry archive or unpacked source) and files hashed."""

    findings: list[Finding] = field(default_factory=list)
    lockfiles: int = 0
    crates: int = 0
    files: int = 0

    @property
    def examined(self) -> bool:
        """Whether anything at all was looked at."""
        return bool(self.lockfiles or self.crates or self.files)


def _walk(root: str) -> Iterator[tuple[str, list[str]]]:
    """(directory, file names) below ``root``, build outputs and VCS data skipped; a file
    given as ``root`` is its directory with that one file."""
    if os.path.isfile(root):
        yield os.path.dirname(root) or ".", [os.path.basename(root)]
        return
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        yield dirpath, sorted(files)


def manifest_package(path: str) -> tuple[str, str | None] | None:
    """``(name, version)`` of a ``Cargo.toml``'s ``[package]`` (None: a virtual manifest or
    unreadable). A version inherited from the workspace (``version.workspace = true``) is
    unknown here: None."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return None
    package = data.get("package")
    if not isinstance(package, dict) or not isinstance(package.get("name"), str):
        return None
    version = package.get("version")
    return package["name"], version if isinstance(version, str) else None


def scan_lockfile(path: str, ind: Indicators, result: ScanResult | None = None
                  ) -> list[Finding]:
    """Listed crates in one Cargo.lock (counted in ``result`` when given)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable Cargo.lock ({exc})") from exc
    out = []
    packages = data.get("package", [])
    for pkg in packages if isinstance(packages, list) else []:
        if not isinstance(pkg, dict):
            continue
        name, version = str(pkg.get("name", "")), pkg.get("version")
        version = version if isinstance(version, str) else None
        hit = ind.crate(name, version)
        if hit:
            out.append(Finding("crate", path, name, version, hit.why, hit.source))
        if result is not None:
            result.crates += 1
    if result is not None:
        result.lockfiles += 1
    return out


def scan_tree(root: str, ind: Indicators, result: ScanResult) -> None:
    """Lock files and crate sources (directories with a package manifest) below ``root``."""
    for dirpath, files in _walk(root):
        if "Cargo.lock" in files:
            result.findings.extend(scan_lockfile(os.path.join(dirpath, "Cargo.lock"), ind,
                                                 result))
        if "Cargo.toml" not in files:
            continue
        manifest = os.path.join(dirpath, "Cargo.toml")
        package = manifest_package(manifest)
        if package is None:
            continue
        result.crates += 1
        name, version = package
        hit = ind.crate(name, version)
        if hit:
            kind = "vendored" if ".cargo-checksum.json" in files else "source"
            result.findings.append(Finding("crate", manifest, name, version,
                                           f"{hit.why} ({kind} crate)", hit.source))
        if ind.files:
            result.findings.extend(_scan_tree(dirpath, ind, result, nested=False))


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


def scan_registry(cargo_home: str, ind: Indicators, result: ScanResult | None = None
                  ) -> list[Finding]:
    """Listed crates and files in a Cargo home's registry cache and sources."""
    result = result if result is not None else ScanResult()
    out: list[Finding] = []
    cache = os.path.join(cargo_home, "registry", "cache")
    src = os.path.join(cargo_home, "registry", "src")
    for dirpath, _dirs, files in os.walk(cache):
        for name in sorted(files):
            if not name.endswith(".crate"):
                continue
            path = os.path.join(dirpath, name)
            result.crates += 1
            crate = _crate_hit(ind, path, name)
            if crate:
                out.append(crate)
            if ind.files:
                out.extend(_scan_archive(path, ind, result))
    if os.path.isdir(src):
        for index in sorted(os.listdir(src)):
            if not os.path.isdir(os.path.join(src, index)):
                continue
            for crate_dir in sorted(os.listdir(os.path.join(src, index))):
                base = os.path.join(src, index, crate_dir)
                result.crates += 1
                crate = _crate_hit(ind, base, crate_dir)
                if crate:
                    out.append(crate)
                if ind.files:
                    out.extend(_scan_tree(base, ind, result))
    return out


def _scan_archive(path: str, ind: Indicators, result: ScanResult) -> list[Finding]:
    out = []
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                if not member.isfile() or member.size > MAX_FILE:
                    continue
                stream = tar.extractfile(member)
                if stream is None:
                    continue
                result.files += 1
                hit = _file_hit(ind, _sha256(stream), f"{path}!{member.name}")
                if hit:
                    out.append(hit)
    except (OSError, tarfile.TarError):
        pass  # a damaged archive is not a finding; cargo would refuse it too
    return out


def _scan_tree(root: str, ind: Indicators, result: ScanResult, nested: bool = True
               ) -> list[Finding]:
    """Files below ``root`` by hash; with ``nested=False`` a directory that is a crate of its
    own (its own ``Cargo.toml``) is left to its own visit, so no file is hashed twice."""
    out = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and (
            nested or not os.path.isfile(os.path.join(dirpath, d, "Cargo.toml")))]
        for name in files:
            path = os.path.join(dirpath, name)
            try:
                if os.path.islink(path) or os.path.getsize(path) > MAX_FILE:
                    continue
                with open(path, "rb") as f:
                    hit = _file_hit(ind, _sha256(f), path)
            except OSError:
                continue
            result.files += 1
            if hit:
                out.append(hit)
    return out


def scan(paths: list[str], cargo_home: str | None, ind: Indicators) -> ScanResult:
    """Everything examined and found below ``paths`` and in ``cargo_home`` (None: skip the
    registry)."""
    result = ScanResult()
    for root in paths:
        scan_tree(root, ind, result)
    if cargo_home:
        result.findings.extend(scan_registry(cargo_home, ind, result))
    return result
