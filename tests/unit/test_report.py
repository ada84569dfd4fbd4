"""report.py on recorded audit events: per build, destinations by role and crate with the
verdict and the would-be verdict, DNS names, alerts; text, markdown and JSON."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from egress_monitor.report import build_reports, md, parse_lines, parse_since, render
from tests.fixtures.audit_events import events


def test_one_report_per_build_with_would_be_denials() -> None:
    first, second = build_reports(events())
    assert (first.id, first.argv, first.ended) == ("b1-100", ("cargo", "build"),
                                                   "2026-12-01T10:00:09.000000Z")
    assert second.ended is None  # its end was not recorded
    named = next(d for d in first.destinations if d.port == 8080 and d.names)
    assert (named.role, named.crate, named.names[0], named.would_be_denied) == \
        ("build-script", "evil-dep 0.3.10", "pkg.test.example", True)
    cargo = next(d for d in first.destinations if d.role == "cargo")
    assert not cargo.would_be_denied and cargo.rule == "cargo-registry"
    assert first.would_be_denied == 3
    assert [(n.name, n.qtype, n.policy_decision) for n in first.names] == \
        [("pkg.test.example", "A", "deny")]
    assert [a.kind for a in first.alerts] == ["http_post"]
    assert "containing AWS_SECRET_ACCESS_KEY to 198.51.100.66:80" in first.alerts[0].sentence


def test_filters() -> None:
    assert [r.id for r in build_reports(events(), build="b2-200")] == ["b2-200"]
    assert [r.id for r in build_reports(events(), since="2026-12-01T10:30")] == ["b2-200"]
    now = datetime(2026, 12, 1, 11, 30, tzinfo=UTC)
    assert parse_since("1h", now) == "2026-12-01T10:30:00.000000Z"
    assert parse_since("2026-12-01", now) == "2026-12-01"
    with pytest.raises(ValueError):
        parse_since("yesterday", now)


def test_text_markdown_and_json_name_crate_role_name_port_and_the_would_be_deny() -> None:
    reports = build_reports(events(), build="b1-100")
    text = render(reports, "text")
    line = next(ln for ln in text.splitlines() if "pkg.test.example" in ln and ":8080" in ln)
    assert "build-script" in line and "evil-dep 0.3.10" in line
    assert "WOULD BE DENIED by enforce" in line
    markdown = render(reports, "markdown")
    assert "| build-script | evil-dep 0.3.10 | pkg.test.example,mid.test.example " \
        "(198.51.100.2):8080 | tcp | allowed, WOULD BE DENIED by enforce (deny) | " \
        "default:build-script | 1 |" in markdown
    data = json.loads(render(reports, "json"))
    dest = next(d for d in data["builds"][0]["destinations"] if d["port"] == 8080
                and d["names"])
    assert dest["would_be_denied"] is True and dest["crate"] == "evil-dep 0.3.10"
    assert data["builds"][0]["would_be_denied"] == 3


def test_markdown_cannot_be_broken_out_of_by_a_build() -> None:
    assert md("a|b\n## x <img src=y>") == "a\\|b \\#\\# x \\<img src=y\\>"
    hostile = events()[:2]
    hostile[1] = {**hostile[1], "argv": ["cargo", "| evil | row |\n# heading"]}
    out = render(build_reports(hostile), "markdown")
    assert "\n# heading" not in out and "\\| evil \\|" in out


def test_lines_that_are_not_events_are_counted_not_fatal() -> None:
    records, bad = parse_lines(['{"type":"daemon","ts":"t"}\n', "not json\n", "[1]\n", "\n",
                                '{"type": 1, "ts": "t"}\n'])
    assert len(records) == 1 and bad == 3


def test_records_of_a_shape_the_daemon_never_writes_are_left_out() -> None:
    from egress_monitor.suggest import suggest

    odd: list[dict[str, Any]] = [
        {"ts": "t", "type": "connection", "build": {"id": "x"}, "dst": {"port": "eighty"}},
        {"ts": "t", "type": "connection", "build": {"id": "x"}, "dst": "nowhere"},
        {"ts": "t", "type": "build_start", "build": {"id": "y"}, "argv": 5}]
    reports = build_reports(odd + events())
    assert [r.id for r in reports][-2:] == ["b1-100", "b2-200"]
    assert "seen-build-script-evil-dep" in suggest(odd + events()).text
