"""Policy, drop-in, config and indicator files that fail to load, one class of breakage at a
time: always the loader's own error as ``file:line:column: message``, never a traceback, and
the same message and a non-zero exit from the command line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from egress_monitor.cli import main
from egress_monitor.config import load_config
from egress_monitor.iocs import load_iocs
from egress_monitor.policy.loader import PolicyError, load_policy
from egress_monitor.yamlcheck import MAX_BYTES, YamlError

ALIAS_BOMB = b"g0: &a0 [a, a, a, a, a, a, a, a, a, a]\n" + b"".join(
    b"g%d: &a%d [" % (d, d) + b", ".join([b"*a%d" % (d - 1)] * 10) + b"]\n"
    for d in range(1, 6))

# class -> (policy text, the line its first error names, words of that error)
POLICIES: dict[str, tuple[bytes, int, str]] = {
    "syntax error": (b"version: 1\nrules: [ {id: x, action: allow\n", 3, "invalid YAML"),
    "not UTF-8": (b"version: 1\nmode: audit\n# caf\xe9\n", 3, "not UTF-8 (byte 0xe9)"),
    "alias bomb": (b"version: 1\ngroups:\n" + b"".join(b"  " + line + b"\n" for line in
                                                    ALIAS_BOMB.splitlines()), 7,
                   "aliases expand this file to more than"),
    "alias cycle": (b"version: 1\nrules: &r [*r]\n", 2, "alias *r inside its own anchor"),
    "deep nesting": (b"version: 1\nrules: " + b"[" * 5000 + b"]" * 5000 + b"\n", 2,
                     "nested deeper than 32 levels"),
    "huge int": (b"version: " + b"9" * 5000 + b"\n", 1, "key 'version': expected 1"),
    "unicode digit": ("version: 1\ngroups:\n  g: {ports: ['\u00b2']}\n".encode(), 3,
                      "expected a port or a range"),
    "bad key": (b"version: 1\nmodes: enforce\n", 2, "unknown key 'modes'"),
    "key not a string": (b"version: 1\ngroups: {[a]: {ports: [1]}}\n", 2,
                         "expected group names, got a sequence"),
    "too large": (b"version: 1\n#" + b"x" * MAX_BYTES + b"\n", 1, "larger than"),
}


def test_broken_dropin_names_the_dropin(tmp_path: Path) -> None:
    main_file = tmp_path / "policy.yaml"
    main_file.write_text("version: 1\n")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "10-ok.yaml").write_text("version: 1\n")
    (tmp_path / "d" / "20-bad.yaml").write_bytes(b"version: 1\nrules: [\xff]\n")
    with pytest.raises(PolicyError) as exc:
        load_policy(str(main_file), str(tmp_path / "d"))
    assert str(exc.value).startswith(f"{tmp_path / 'd' / '20-bad.yaml'}:2:9: not UTF-8")


CONFIGS: dict[str, tuple[bytes, int, str]] = {
    "syntax error": (b"dns: {port: 53\n", 2, "invalid YAML"),
    "not UTF-8": (b"runner_name: r\xfcnner\n", 1, "not UTF-8"),
    "alias bomb": (ALIAS_BOMB, 5, "aliases expand"),
    "deep nesting": (b"dns: " + b"{a: " * 100 + b"\n", 1, "nested deeper"),
    "huge int": (b"upload_threshold: " + b"7" * 5000 + b"\n", 1,
                 "key 'upload_threshold': expected a number of bytes"),
    "unicode digit": ("dns: {port: '\u0663'}\n".encode(), 1, "key 'dns.port': expected a port"),
    "unicode digit listen": ("metrics_listen: 'a:\u00b2'\n".encode(), 1, "HOST:PORT"),
    "bad url": (b"alertmanager: {urls: ['http://[am']}\n", 1, "expected an http(s) URL"),
    "bad upstream": (b"dns: {upstreams: ['10.0.0.2:x']}\n", 1, "expected ADDR, ADDR:PORT"),
    "bad key": (b"dns: {servers: []}\n", 1, "unknown key 'dns.servers'"),
}


LOADERS: dict[str, Callable[[str], object]] = {"policy": load_policy, "config": load_config}
CASES = [("policy", c) for c in POLICIES] + [("config", c) for c in CONFIGS]


@pytest.mark.parametrize(("kind", "case"), CASES)
def test_broken_file_names_file_and_line(kind: str, case: str, tmp_path: Path) -> None:
    text, line, words = (POLICIES if kind == "policy" else CONFIGS)[case]
    path = tmp_path / f"{kind}.yaml"
    path.write_bytes(text)
    with pytest.raises(YamlError) as exc:  # PolicyError is the same class
        LOADERS[kind](str(path))
    first = str(exc.value.issues[0])
    assert first.startswith(f"{path}:{line}:") and words in first, first
    assert len(str(exc.value)) < 50_000  # an alias fan-out of errors stays small


@pytest.mark.parametrize("text", [b"crates: [{name: x, versions: '=" + b"1" * 5000 + b"'}]\n",
                                  "crates: [{name: x, versions: '^\u0663'}]\n".encode(),
                                  b"files: [{sha256: \xff}]\n", ALIAS_BOMB])
def test_broken_indicators(text: bytes, tmp_path: Path) -> None:
    path = tmp_path / "iocs.yaml"
    path.write_bytes(text)
    with pytest.raises(YamlError) as exc:
        load_iocs(str(path))
    assert str(exc.value).startswith(f"{path}:1:") or str(exc.value).startswith(f"{path}:5:")


@pytest.mark.parametrize("case", POLICIES)
def test_policy_check_prints_the_error_and_fails(case: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    text, line, _words = POLICIES[case]
    path = tmp_path / "p.yaml"
    path.write_bytes(text)
    assert main(["policy", "check", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{path}:{line}:") and "Traceback" not in err


def test_run_with_a_broken_config_or_policy_exits_with_the_message(
        tmp_path: Path, capfd: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # As root; both files fail before anything touches the kernel.
    monkeypatch.setattr("os.geteuid", lambda: 0)
    config = tmp_path / "config.yaml"
    config.write_bytes(b"dns: {port: '\xb2'}\n")
    assert main(["run", "--config", str(config), "--runtime-dir", str(tmp_path)]) == 2
    err = capfd.readouterr().err
    assert f"{config}:1:" in err and "not UTF-8" in err and "Traceback" not in err
    policy = tmp_path / "policy.yaml"
    policy.write_bytes(POLICIES["alias bomb"][0])
    assert main(["run", "--policy", str(policy), "--runtime-dir", str(tmp_path)]) == 2
    err = capfd.readouterr().err
    assert f"{policy}:7:" in err and "aliases expand" in err and "Traceback" not in err
