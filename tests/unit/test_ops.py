"""Runner operations without root: config, sd_notify, indicators, RustSec, scan."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import tarfile
from pathlib import Path

import pytest

from egress_monitor.cli import main
from egress_monitor.config import load_config, parse_config
from egress_monitor.iocs import load_iocs, parse_iocs, rustsec_malicious
from egress_monitor.scan import scan
from egress_monitor.sdnotify import Notifier
from egress_monitor.yamlcheck import YamlError

REPO = Path(__file__).parents[2]


def test_shipped_config_and_iocs_load() -> None:
    cfg = load_config(str(REPO / "deploy" / "config.yaml"))
    assert cfg.policy == "/etc/egress-monitor/policy.yaml" and cfg.fail_mode == "closed"
    assert cfg.dns_port == 15353 and cfg.metrics_listen == "127.0.0.1:9464"
    iocs = load_iocs(str(REPO / "policies" / "iocs.yaml"))
    assert iocs.crate("mysten-metrics", "9.9.9") is not None
    assert iocs.crate("liblzma-sys", "0.3.2") is not None
    assert iocs.crate("liblzma-sys", "0.3.3") is None
    assert iocs.crate("arrayref", "0.3.10") is not None and iocs.crate("arrayref", "0.3.9") is None
    assert {f.sha256[:8] for f in iocs.files} == {"ecda10d8", "9aef8982"}


def config_errors(text: str) -> list[str]:
    with pytest.raises(YamlError) as exc:
        parse_config(text, "c.yaml")
    return [str(i) for i in exc.value.issues]


def test_config_errors_name_file_line_and_key() -> None:
    assert config_errors("version: 1\nmetrics: 1\n") == [
        "c.yaml:2:1: unknown key 'metrics' (expected one of: version, policy, policy_dir, "
        "events, metrics_listen, runner_name, fail_mode, iocs, upload_threshold, dns, "
        "alertmanager, kernel, engine_sockets, engine_cgroups)"]
    assert config_errors("metrics_listen: localhost\nfail_mode: ajar\n") == [
        "c.yaml:1:17: key 'metrics_listen': expected HOST:PORT, got 'localhost'",
        "c.yaml:2:12: key 'fail_mode': expected one of closed, open, got 'ajar'"]
    assert config_errors("dns: {port: 0, servers: []}\nalertmanager: {urls: [am:9093]}\n") == [
        "c.yaml:1:16: unknown key 'dns.servers' (expected one of: upstreams, port)",
        "c.yaml:1:13: key 'dns.port': expected a port 1-65535, got '0'",
        "c.yaml:2:23: key 'alertmanager.urls': expected an http(s) URL, got 'am:9093'"]


def test_config_kernel_section() -> None:
    cfg = parse_config("kernel:\n  degraded: true\n  mark_tag: 0x40000000/0x40000000\n"
                       "  mark_tgid: 22/0\n  cargo: [/opt/c]\n  rustup_homes: [/h/.rustup]\n"
                       "  build_script_runners: [/b/runner, /b/py]\n", "c.yaml")
    assert cfg.degraded is True and cfg.mark_tag == (0x40000000, 0x40000000)
    assert cfg.mark_tgid == (22, 0) and cfg.cargo_paths == ("/opt/c",)
    assert cfg.rustup_homes == ("/h/.rustup",)
    assert cfg.build_script_runners == ("/b/runner", "/b/py")
    assert parse_config("kernel: {mark_fast: 0x20000000}\n", "c").mark_fast == 0x20000000
    assert parse_config("kernel: {mark_fast: 0}\n", "c").mark_fast == 0
    assert config_errors("kernel: {mark_fast: '0x3'}\n") == [
        "c.yaml:1:21: key 'kernel.mark_fast': expected one bit (a power of two, 0x for hex) or "
        "0, got '0x3'"]
    assert config_errors("kernel: {mark_tag: '7', degraded: maybe}\n") == [
        "c.yaml:1:35: key 'kernel.degraded': expected one of true, false, got 'maybe'",
        "c.yaml:1:20: key 'kernel.mark_tag': expected A/B (numbers, 0x for hex), got '7'"]


def test_config_engine_sockets() -> None:
    cfg = parse_config("engine_sockets: [/srv/d.sock, '/run/user/*/x.sock']\n", "c.yaml")
    assert cfg.engine_sockets == ("/srv/d.sock", "/run/user/*/x.sock")
    assert parse_config("version: 1\n", "c.yaml").engine_sockets == ()


def test_sd_notify_sends_datagrams(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000"})
        assert n.watchdog_interval_s == 15.0
        assert n.notify("READY=1", "STATUS=ok")
        assert sock.recv(100) == b"READY=1\nSTATUS=ok"
    quiet = Notifier({})
    assert not quiet.notify("READY=1") and quiet.watchdog_interval_s is None
    other = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval_s is None  # the watchdog is another process's


def test_iocs_errors() -> None:
    with pytest.raises(YamlError) as exc:
        parse_iocs("crates:\n  - {versions: '=1'}\n  - {name: x, versions: 'bad'}\n"
                   "files:\n  - {sha256: ABC}\n", "i.yaml")
    assert [str(i) for i in exc.value.issues] == [
        "i.yaml:2:5: crates[0]: missing key 'name'",
        "i.yaml:3:25: key 'crates[1].versions': 'bad' is not a version requirement (expected "
        "e.g. '^1.2', '>=0.3, <0.4', '=0.3.10' or '*')",
        "i.yaml:5:14: key 'files[0].sha256': expected 64 lower-case hex digits, got 'ABC'"]


def test_rustsec_malicious_advisories(tmp_path: Path) -> None:
    crates = tmp_path / "crates"
    for name, body in {
        "evil-x": '[advisory]\nid = "RUSTSEC-2099-0001"\npackage = "evil-x"\n'
                  'title = "Malicious crate evil-x"\n',
        "sneaky": '[advisory]\nid = "RUSTSEC-2099-0002"\npackage = "sneaky"\n'
                  'informational = "malicious"\ntitle = "Typosquat"\n',
        "buggy": '[advisory]\nid = "RUSTSEC-2099-0003"\npackage = "buggy"\n'
                 'title = "Use after free"\n',
    }.items():
        (crates / name).mkdir(parents=True)
        (crates / name / f"RUSTSEC-2099-000{len(name)}.md").write_text(
            f"```toml\n{body}```\n\n# Text\n")
    more = {
        # a compromised release of a good crate: only the versions not listed as fine
        "goodcrate": '[advisory]\nid = "RUSTSEC-2099-0010"\npackage = "goodcrate"\n'
                     'categories = ["malicious"]\n[versions]\nunaffected = ["<= 0.3.9"]\n'
                     'patched = []\n',
        # no categories: the heading says it, and crates.io deleted the crate
        "dropper": '[advisory]\nid = "RUSTSEC-2099-0011"\npackage = "dropper"\n'
                   'expect-deleted = true\n',
        # a vulnerability about malicious input is not a malicious crate
        "parser": '[advisory]\nid = "RUSTSEC-2099-0012"\npackage = "parser"\n'
                  '[versions]\npatched = [">= 1.2.0"]\n',
    }
    headings = {"dropper": "`dropper` was removed from crates.io for malicious code",
                "parser": "Stack overflow when parsing malicious input"}
    for name, body in more.items():
        (crates / name).mkdir(parents=True)
        (crates / name / "RUSTSEC-2099-0010.md").write_text(
            f"```toml\n{body}```\n\n# {headings.get(name, 'Compromised release')}\n")
    found = rustsec_malicious(str(tmp_path))
    assert sorted(c.name for c in found.crates) == ["dropper", "evil_x", "goodcrate", "sneaky"]
    assert found.crate("evil-x", "0.0.1") is not None
    assert found.crate("goodcrate", "0.3.10") is not None
    assert found.crate("goodcrate", "0.3.9") is None and found.crate("goodcrate", None) is None
    assert found.crate("dropper", None) is not None
    hit = found.crate("dropper", "1.0.0")
    assert hit is not None and "removed from crates.io" in hit.why


def write_crate(path: Path, name: str, version: str, files: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for rel, data in files.items():
            info = tarfile.TarInfo(f"{name}-{version}/{rel}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_scan_finds_listed_crates_and_files_and_nothing_in_clean_fixtures(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    payload = b"\xfd7zXZ pretend this is the backdoor's test file"
    iocs = tmp_path / "iocs.yaml"
    iocs.write_text("version: 1\ncrates:\n  - {name: arrayref, versions: '=0.3.10', why: "
                    "payload}\nfiles:\n  - {sha256: " + hashlib.sha256(payload).hexdigest() +
                    ", name: bad-3-corrupt_lzma2.xz, why: backdoor}\n")
    bad = tmp_path / "bad" / "project"
    bad.mkdir(parents=True)
    (bad / "Cargo.lock").write_text(
        'version = 3\n\n[[package]]\nname = "arrayref"\nversion = "0.3.10"\n\n'
        '[[package]]\nname = "serde"\nversion = "1.0.0"\n')
    home = tmp_path / "cargo-home"
    idx = home / "registry" / "cache" / "index.crates.io-6f17d22bba15001f"
    write_crate(idx / "liblzma-sys-0.3.2.crate", "liblzma-sys", "0.3.2",
                {"xz/tests/files/bad-3-corrupt_lzma2.xz": payload, "src/lib.rs": b""})
    write_crate(idx / "serde-1.0.0.crate", "serde", "1.0.0", {"src/lib.rs": b"//"})
    src = home / "registry" / "src" / "index.crates.io-6f17d22bba15001f" / "liblzma-sys-0.3.2"
    (src / "xz").mkdir(parents=True)
    (src / "xz" / "bad-3-corrupt_lzma2.xz").write_bytes(payload)

    result = scan([str(tmp_path / "bad")], str(home), load_iocs(str(iocs)))
    findings = result.findings
    assert (result.lockfiles, result.crates) == (1, 2 + 3)  # 2 pinned, 2 archives, 1 source
    got = sorted((f.kind, f.name, f.version or "") for f in findings)
    assert got == [("crate", "arrayref", "0.3.10"), ("file", "bad-3-corrupt_lzma2.xz", ""),
                   ("file", "bad-3-corrupt_lzma2.xz", "")]
    assert any("liblzma-sys-0.3.2.crate!" in f.path for f in findings)

    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "Cargo.lock").write_text('version = 3\n\n[[package]]\nname = "serde"\n'
                                      'version = "1.0.0"\n')
    empty_home = tmp_path / "empty-home"
    assert main(["scan", str(clean), "--cargo-home", str(empty_home), "--iocs", str(iocs)]) == 0
    assert "0 finding(s) in 1 crate(s), 1 lock file(s)" in capsys.readouterr().out
    assert main(["scan", str(tmp_path / "bad"), "--cargo-home", str(home), "--iocs", str(iocs),
                 "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert len(report["findings"]) == 3 and report["indicators"] == {"crates": 1, "files": 1}
    assert report["examined"]["files"] >= 4
    (clean / "Cargo.lock").write_text("not = [toml")
    assert main(["scan", str(clean), "--no-registry", "--iocs", str(iocs)]) == 2


def test_scan_reads_vendored_trees_and_directory_sources_and_says_when_nothing_was_examined(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    payload = b"dropper"
    iocs = tmp_path / "iocs.yaml"
    iocs.write_text("version: 1\ncrates:\n  - {name: proc-macro1, versions: '*', why: "
                    "RUSTSEC-2026-0265}\n  - {name: arrayref, versions: '=0.3.10', why: x}\n"
                    "files:\n  - {sha256: " + hashlib.sha256(payload).hexdigest() +
                    ", name: dropper.bin, why: payload}\n")
    ws = tmp_path / "ws"
    vendored = ws / "vendor" / "proc-macro1"
    (vendored / "src").mkdir(parents=True)
    (vendored / "Cargo.toml").write_text('[package]\nname = "proc-macro1"\nversion = "0.1.1"\n'
                                         '[lib]\nproc-macro = true\n')
    (vendored / ".cargo-checksum.json").write_text('{"files": {}, "package": "00"}')
    (vendored / "build.rs").write_text("fn main() {}")
    (vendored / "dropper.bin").write_bytes(payload)
    fine = ws / "vendor" / "arrayref"
    fine.mkdir(parents=True)
    (fine / "Cargo.toml").write_text('[package]\nname = "arrayref"\nversion = "0.3.9"\n')
    path_dep = ws / "crates" / "arrayref"
    path_dep.mkdir(parents=True)
    (path_dep / "Cargo.toml").write_text('[package]\nname = "arrayref"\nversion = "0.3.10"\n')
    (ws / "Cargo.toml").write_text('[workspace]\nmembers = ["crates/*"]\n')  # virtual
    result = scan([str(ws)], None, load_iocs(str(iocs)))
    got = sorted((f.kind, f.name, f.version or "", f.why) for f in result.findings)
    assert got == [("crate", "arrayref", "0.3.10", "x (source crate)"),
                   ("crate", "proc-macro1", "0.1.1", "RUSTSEC-2026-0265 (vendored crate)"),
                   ("file", "dropper.bin", "", "payload")]
    assert (result.lockfiles, result.crates) == (0, 3) and result.files >= 5
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["scan", str(empty), "--no-registry", "--iocs", str(iocs)]) == 2
    assert "nothing examined" in capsys.readouterr().out
