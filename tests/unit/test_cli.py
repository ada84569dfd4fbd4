"""The command line without a daemon: refusals are clear and nothing runs unwatched."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from egress_monitor.cli import _parser, main
from egress_monitor.config import DEFAULTS, parse_listen
from egress_monitor.sinks.metrics import Metrics


def test_exec_refuses_to_run_unwatched(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    marker = tmp_path / "ran"
    code = main(["exec", "--runtime-dir", str(tmp_path), "--", "touch", str(marker)])
    assert code == 125 and not marker.exists()
    assert "not running touch unwatched: egress-monitor is not running" in \
        capsys.readouterr().err


def test_exec_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["exec", "--runtime-dir", str(tmp_path)]) == 2
    assert main(["exec", "--runtime-dir", str(tmp_path), "--", "no-such-program-x"]) == 127
    assert "command not found" in capsys.readouterr().err


def test_policy_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("version: 1\nmode: enforce\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nmode: loud\n")
    assert main(["policy", "check", str(good)]) == 0
    assert main(["policy", "check", str(good), str(bad)]) == 1
    out = capsys.readouterr()
    assert f"{good}: ok" in out.out
    assert f"{bad}:2:7: key 'mode'" in out.err


def test_status_without_daemon(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--runtime-dir", str(tmp_path)]) == 3
    assert "not running" in capsys.readouterr().err


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen("[::1]:9464") == ("::1", 9464)
    assert parse_listen(":9464") == ("0.0.0.0", 9464)
    for bad in ("9464", "host:", "h:70000"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_metric_names_and_labels_are_bounded() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.connections.labels("build-script", "allow", "tcp").inc()
    metrics.track(lambda: 5, lambda: 1, lambda: 3)
    text = generate_latest(registry).decode()
    assert 'egress_monitor_connections_total{decision="allow",protocol="tcp",' \
        'role="build-script"} 1.0' in text
    assert "egress_monitor_builds_active 1.0" in text
    assert "egress_monitor_tracked_processes 5.0" in text
    assert "egress_monitor_dns_knowledge_entries 3.0" in text
    for name in ("egress_monitor_verdict_latency_seconds_bucket",
                 "egress_monitor_proc_events_lost_total", "egress_monitor_info"):
        assert name in text


def test_policy_check_prints_warnings_and_explain_names_the_rule(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\nmode: enforce\ngroups:\n  reg: {hosts: ['*.crates.io']}\n"
                      "rules:\n  - {id: reg, role: cargo, to: [reg], action: allow}\n"
                      "  - {id: dup, role: cargo, to: [reg], action: deny}\n")
    assert main(["policy", "check", str(policy)]) == 0
    out = capsys.readouterr()
    assert f"{policy}: ok, mode enforce, 2 rule(s)" in out.out
    assert f"{policy}:7: rule 'dup' is shadowed by rule 'reg'" in out.err
    assert main(["policy", "explain", "--policy", str(policy), "--role", "cargo",
                 "--dest", "index.crates.io:443/tcp"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "decision: allow (mode enforce: enforced)", "rule: reg",
        f"why: rule 'reg' ({policy}:6) matches the process and destination 'reg'",
        "dns: resolving index.crates.io is allowed (reg)"]
    assert main(["policy", "explain", "--policy", str(policy), "--role", "build-script",
                 "--crate", "evil@1.0.0", "--dest", "[2001:db8::1]:80/tcp"]) == 0
    assert "rule: default:build-script" in capsys.readouterr().out
    assert main(["policy", "explain", "--policy", str(policy), "--role", "cargo",
                 "--dest", "host:notaport"]) == 2


def test_command_line_defaults_are_the_daemon_config_defaults() -> None:
    args = _parser().parse_args(["run"])
    for flag, field in (("queue_base", "queue_base"), ("max_builds", "max_builds"),
                        ("sink_port", "sink_port"), ("dns_min_ttl", "dns_min_ttl"),
                        ("dns_max_ttl", "dns_max_ttl"), ("dns_ttl_overlap", "dns_overlap"),
                        ("proc_rcvbuf", "proc_rcvbuf"), ("runtime_dir", "runtime_dir")):
        assert getattr(args, flag) == getattr(DEFAULTS, field), flag
    # Unset here, so the config file can set them; the daemon then takes DEFAULTS.
    assert args.dns_port is None and args.upload_threshold is None and args.events is None
    assert _parser().parse_args(["failclosed"]).dns_port is None
