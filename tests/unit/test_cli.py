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


REPO = Path(__file__).parents[2]


def test_explain_without_a_protocol_judges_tcp_and_says_so(
        capsys: pytest.CaptureFixture[str]) -> None:
    # The README's own example: the shipped policy's rule needs tcp, which --dest may omit.
    assert main(["policy", "explain", "--policy", str(REPO / "policies" / "default.yaml"),
                 "--role", "cargo", "--dest", "index.crates.io:443"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == ["decision: allow (mode audit: recorded only)",
                       "protocol: tcp (none given)",
                       "  over udp it would be: deny (default:cargo)"]
    assert "rule: cargo-registry" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from egress_monitor import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out == f"egress-monitor {__version__}\n"


def write_events(path: Path) -> Path:
    import json

    from tests.fixtures.audit_events import events

    path.write_text("".join(json.dumps(e) + "\n" for e in events()) + "garbage\n")
    return path


def test_report_and_suggest_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    events = write_events(tmp_path / "events.jsonl")
    assert main(["report", str(events), "--build", "b1-100", "--format", "markdown"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("## egress-monitor: build b1-100")
    assert "1 line(s) that are not events skipped" in out.err
    assert main(["report", str(tmp_path / "missing.jsonl")]) == 2
    assert main(["report", str(events), "--since", "soon"]) == 2
    capsys.readouterr()
    base = REPO / "policies" / "default.yaml"
    assert main(["policy", "suggest", str(events), "--base", str(base)]) == 0
    out = capsys.readouterr()
    dropin = tmp_path / "policy.d" / "50-seen.yaml"
    dropin.parent.mkdir()
    dropin.write_text(out.out)
    assert "1 rule(s), 2 group(s), 2 flagged destination(s) left out" in out.err
    assert main(["policy", "check", str(base), "--dir", str(dropin.parent)]) == 0


def test_json_log_lines() -> None:
    import json
    import logging

    from egress_monitor.logfmt import formatter

    record = logging.LogRecord("egress_monitor.daemon", logging.WARNING, "f", 1,
                               "policy: %s", ("x",), None)
    line = json.loads(formatter("json").format(record))
    assert line["level"] == "warning" and line["message"] == "policy: x"
    assert line["logger"] == "egress_monitor.daemon" and line["ts"].endswith("Z")


def test_exec_summary_refuses_to_run_unwatched(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    marker, summary = tmp_path / "ran", tmp_path / "summary.md"
    code = main(["exec", "--runtime-dir", str(tmp_path), "--summary", str(summary), "--",
                 "touch", str(marker)])
    assert code == 125 and not marker.exists() and not summary.exists()
    assert "not running touch unwatched" in capsys.readouterr().err


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
