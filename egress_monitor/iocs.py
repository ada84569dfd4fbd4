"""Indicators of known-bad crates and files (pure): the list format and matching.

Sources: ``policies/iocs.yaml`` (installed as /etc/egress-monitor/iocs.yaml) and, optionally,
a local checkout of the RustSec advisory database, whose advisories for malicious crates are
read as "every version" indicators.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass

import yaml

from egress_monitor.policy.semver import VersionError, VersionReq
from egress_monitor.yamlcheck import Issue, YamlError, YamlFile, compose, read, shown

_TOML_BLOCK = re.compile(r"```toml\s*\n(.*?)```", re.S)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEADING = re.compile(r"^#\s+(.+)$", re.M)


@dataclass(frozen=True, slots=True)
class CrateIndicator:
    """A crate name (normalised: '-' as '_') and the versions that are bad."""

    name: str
    versions: VersionReq
    why: str
    source: str
    safe: tuple[VersionReq, ...] = ()  # versions excepted (RustSec's unaffected and patched)

    def matches(self, name: str, version: str | None) -> bool:
        """Whether a crate at a version is this indicator (an unknown version matches "*"
        with no exceptions)."""
        if name.replace("-", "_") != self.name:
            return False
        if version is None:
            return self.versions.text.strip() == "*" and not self.safe
        return self.versions.matches(version) and not any(r.matches(version)
                                                          for r in self.safe)


@dataclass(frozen=True, slots=True)
class FileIndicator:
    """A file by SHA-256."""

    sha256: str
    name: str
    why: str
    source: str


@dataclass(frozen=True, slots=True)
class Indicators:
    """Everything to look for."""

    crates: tuple[CrateIndicator, ...] = ()
    files: tuple[FileIndicator, ...] = ()

    def crate(self, name: str, version: str | None) -> CrateIndicator | None:
        """The first indicator a crate matches."""
        return next((c for c in self.crates if c.matches(name, version)), None)

    def merged(self, other: Indicators) -> Indicators:
        """Both lists."""
        return Indicators(self.crates + other.crates, self.files + other.files)


def parse_iocs(text: str | bytes, path: str) -> Indicators:
    """Validate an indicator file; raises YamlError (errors as file:line:column), and nothing
    else, for any input."""
    issues: list[Issue] = []
    f = YamlFile(path, issues)
    root = compose(text, path)
    if root is None:
        return Indicators()
    fields = f.mapping(root, "", ("version", "crates", "files"))
    crates: list[CrateIndicator] = []
    files: list[FileIndicator] = []
    for i, item in enumerate(_items(fields, "crates", f)):
        entry = f.mapping(item, f"crates[{i}]", ("name", "versions", "why"))
        name = f.string(entry["name"][1], f"crates[{i}].name") if "name" in entry else None
        if "name" not in entry:
            f.error(item, f"crates[{i}]: missing key 'name'")
        text_req = f.string(entry["versions"][1], f"crates[{i}].versions") \
            if "versions" in entry else "*"
        why = f.string(entry["why"][1], f"crates[{i}].why") if "why" in entry else ""
        try:
            req = VersionReq(text_req or "*")
        except VersionError as exc:
            f.error(entry["versions"][1], f"key 'crates[{i}].versions': {exc}")
            continue
        if name:
            crates.append(CrateIndicator(name.replace("-", "_"), req, why or "", path))
    for i, item in enumerate(_items(fields, "files", f)):
        entry = f.mapping(item, f"files[{i}]", ("sha256", "name", "why"))
        digest = f.string(entry["sha256"][1], f"files[{i}].sha256") if "sha256" in entry \
            else None
        if digest is not None and not _HEX64.match(digest):
            f.error(entry["sha256"][1], f"key 'files[{i}].sha256': expected 64 lower-case hex "
                    f"digits, got '{shown(digest)}'")
            continue
        if digest is None:
            f.error(item, f"files[{i}]: missing key 'sha256'")
            continue
        name = f.string(entry["name"][1], f"files[{i}].name") if "name" in entry else ""
        why = f.string(entry["why"][1], f"files[{i}].why") if "why" in entry else ""
        files.append(FileIndicator(digest, name or "", why or "", path))
    if issues:
        raise YamlError(issues)
    return Indicators(tuple(crates), tuple(files))


def _items(fields: dict[str, tuple[yaml.Node, yaml.Node]], key: str,
           f: YamlFile) -> list[yaml.Node]:
    if key not in fields:
        return []
    node = fields[key][1]
    if not isinstance(node, yaml.SequenceNode):
        f.error(node, f"key '{key}': expected a list")
        return []
    return list(node.value)


def load_iocs(path: str) -> Indicators:
    """Read an indicator file; raises YamlError, only."""
    return parse_iocs(read(path), path)


def rustsec_malicious(db: str) -> Indicators:
    """Malicious-crate advisories from a RustSec advisory-db checkout (``crates/*/*.md``).

    An advisory counts when its ``informational``, ``categories`` or ``keywords`` say
    "malicious", or its title (the TOML ``title`` or the Markdown heading after the block)
    says malicious or malware of a crate crates.io deleted (``expect-deleted``), or begins
    "malicious crate"; withdrawn advisories do not. Every version is bad
    except those the advisory's ``[versions]`` lists as ``unaffected`` or ``patched``
    (``arrayref`` 0.3.9 and older are fine; only 0.3.10 was compromised).
    """
    found: list[CrateIndicator] = []
    root = os.path.join(db, "crates")
    for dirpath, _dirs, files in os.walk(root):
        for name in sorted(files):
            if not name.startswith("RUSTSEC-") or not name.endswith(".md"):
                continue
            path = os.path.join(dirpath, name)
            indicator = _advisory(path)
            if indicator is not None:
                found.append(indicator)
    return Indicators(tuple(found))


def _advisory(path: str) -> CrateIndicator | None:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        block = _TOML_BLOCK.search(text)
        data = tomllib.loads(block.group(1)) if block else {}
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return None
    adv = data.get("advisory", {})
    if not isinstance(adv, dict) or adv.get("withdrawn"):
        return None
    lists = [adv.get("categories", []), adv.get("keywords", [])]
    words = [str(adv.get("informational", ""))] + [
        str(x) for values in lists if isinstance(values, list) for x in values]
    heading = _HEADING.search(text[block.end():]) if block else None
    title = str(adv.get("title") or (heading.group(1) if heading else "")).strip()
    lowered = title.lower()
    # A title alone is not enough: "malicious input" advisories are about vulnerable crates.
    # It counts for a crate crates.io deleted, or one the title calls a malicious crate.
    said = "malicious" in lowered or "malware" in lowered
    if not ("malicious" in words or "malware" in words
            or (said and adv.get("expect-deleted")) or lowered.startswith("malicious crate")):
        return None
    package = str(adv.get("package", "")).replace("-", "_")
    versions = data.get("versions", {})
    safe: list[VersionReq] = []
    for key in ("unaffected", "patched"):
        reqs = versions.get(key, []) if isinstance(versions, dict) else []
        for req in reqs if isinstance(reqs, list) else []:
            try:
                safe.append(VersionReq(str(req)))
            except VersionError:
                return None  # a range we cannot read: better no indicator than a wrong one
    if not package:
        return None
    return CrateIndicator(package, VersionReq("*"), f"{adv.get('id')}: {title}", path,
                          tuple(safe))
