"""sinks/terminal.py: one human line per build start and end, alert and would-be denial."""

from __future__ import annotations

import io

from egress_monitor.sinks.terminal import TerminalSink, render, safe
from tests.fixtures.audit_events import events


def lines() -> list[str]:
    return [line for e in events() if (line := render(e)) is not None]


def test_a_line_per_build_alert_and_would_be_denial_and_none_for_the_rest() -> None:
    out = lines()
    assert out[0] == "build b1-100 started: cargo build in /w/app (via cargo)"
    assert ("ALERT critical http_post: build-script of evil-dep 0.3.10 (build-script-build, "
            "pid 101) sent an HTTP POST 3.1 kB containing AWS_SECRET_ACCESS_KEY to "
            "198.51.100.66:80 (collector.example) (host collector.example, path /x) "
            "[build b1-100]") in out
    end = next(ln for ln in out if ln.startswith("build b1-100 ended"))
    assert end == ("build b1-100 ended after 8.0s: 12 process(es); build scripts: evil-dep "
                   "0.3.10; connections: build-script 4 allowed, 3 would be denied; cargo 1 "
                   "allowed; 3 would be denied in enforce mode")
    would = [ln for ln in out if ln.startswith("would deny (audit)")]
    assert any("connected to 198.51.100.6:8080/tcp;" in ln for ln in would)
    assert any("resolved pkg.test.example" in ln for ln in would)
    # Allowed connections the policy allows, and daemon records, get no line.
    assert not any("index.crates.io" in ln or "15353" in ln for ln in out)
    assert render(events()[0]) is None


def test_a_build_cannot_write_control_characters_to_the_terminal() -> None:
    assert safe("cargo\x1b[2J\nfake line") == "cargo\\x1b[2J\\x0afake line"
    start = {**events()[1], "argv": ["cargo", "\x1b]0;owned\x07"]}
    line = render(start)
    assert line is not None and "\x1b" not in line and "\x07" not in line


def test_the_sink_prefixes_and_flushes_each_line() -> None:
    stream = io.StringIO()
    sink = TerminalSink(stream)
    for e in events()[:3]:
        sink.write(e)
    assert stream.getvalue() == "egress-monitor: build b1-100 started: cargo build in " \
        "/w/app (via cargo)\n"


def test_a_record_the_renderer_cannot_read_is_counted_never_raised() -> None:
    stream = io.StringIO()
    sink = TerminalSink(stream)
    sink.write({"type": "build_end", "build": {"id": "b"}, "summary": {"build_scripts": 5}})
    assert sink.failures == 1 and stream.getvalue() == ""
