"""The rendered ruleset (golden), the iptables command lines, and cgroup bookkeeping."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from egress_monitor.enforce.cgroups import (
    Cgroups,
    build_cgroup_name,
    build_queue_of,
    find_cgroup2_mount,
    parse_build_cgroup,
)
from egress_monitor.enforce.firewall import Firewall, FirewallError
from egress_monitor.enforce.rules import BuildRule, MarkGate, render

GOLDEN_V4 = (Path(__file__).parents[1] / "fixtures" / "ruleset_v4.txt").read_text()
RULES = [BuildRule("/egress-build-q31001-18bd-77", 31001),
         BuildRule("/system.slice/runner.service/egress-build-q31000-18bc-42", 31000)]


def test_render_golden() -> None:
    assert render(RULES, 4, 15353, sink_port=15354) == GOLDEN_V4
    v6 = render(RULES, 6, 15353, sink_port=15354)
    assert "-d ::1/128 -p udp --dport 15353 -j RETURN" in v6
    assert "--reject-with icmp6-adm-prohibited" in v6
    assert v6.replace("::1/128", "127.0.0.1/32").replace(
        "icmp6-adm-prohibited", "icmp-admin-prohibited") == GOLDEN_V4


def test_render_without_dns_guard_and_refuses_unrenderable_paths() -> None:
    text = render(RULES, 4, None)
    assert "REDIRECT" not in text and "--dport 15353" not in text and "53 -j" not in text
    assert text.count("NFQUEUE") == 8  # per build: TCP in nat, others, unplaced, first data
    # Without a resolver the nat chain still gates new TCP connections.
    assert '-A EGRESS-MON-NAT -m cgroup --path "/egress-build-q31001-18bd-77" -p tcp -j ' \
        "NFQUEUE --queue-num 31001" in text
    # Fail closed: --queue-bypass would make a queue nobody reads ACCEPT.
    assert "--queue-bypass" not in GOLDEN_V4
    refusing = render(RULES, 4, 15353, refuse=True)
    assert "NFQUEUE" not in refusing
    assert '-A EGRESS-MON -m cgroup --path "/egress-build-q31001-18bd-77" -p tcp -j REJECT ' \
        "--reject-with tcp-reset" in refusing
    assert refusing.count("icmp-admin-prohibited") == 4  # two mark rules and one per build
    assert "REDIRECT --to-ports 15354" not in render(RULES, 4, 15353, refuse=True)
    with pytest.raises(ValueError):
        render([BuildRule('/a"b', 1)])


class Recorder:
    def __init__(self, fail: set[str] | None = None) -> None:
        self.calls: list[tuple[tuple[str, ...], str | None]] = []
        self.fail = fail or set()

    def __call__(self, argv: Sequence[str], stdin: str | None
                 ) -> subprocess.CompletedProcess[str]:
        self.calls.append((tuple(argv), stdin))
        joined = " ".join(argv)
        code = 1 if any(f in joined for f in self.fail) else 0
        return subprocess.CompletedProcess(list(argv), code, "", "boom" if code else "")


def test_install_puts_one_jump_at_the_top_for_both_families() -> None:
    rec = Recorder()
    Firewall(runner=rec).install()
    argvs = [c[0] for c in rec.calls]
    assert ("iptables-restore", "-w", "--noflush") in argvs
    assert ("ip6tables-restore", "-w", "--noflush") in argvs
    jump = ("OUTPUT", "1", "-m", "conntrack", "--ctstate", "NEW,INVALID,UNTRACKED", "-j",
            "EGRESS-MON")
    for tool in ("iptables", "ip6tables"):
        assert (tool, "-w", "-t", "filter", "-I", *jump) in argvs
        assert any(a[:5] == (tool, "-w", "-t", "filter", "-I") and "connbytes" in a
                   and a[-1] == "EGRESS-MON-DATA" for a in argvs)
        assert (tool, "-w", "-t", "nat", "-I", "OUTPUT", "1", "-j", "EGRESS-MON-NAT") in argvs


def test_reinstall_adds_the_new_jump_before_deleting_old_copies() -> None:
    """A restart or reconcile never has a moment without a jump to the chains."""
    listing = ("-P OUTPUT ACCEPT\n"
               "-A OUTPUT -m conntrack --ctstate INVALID,NEW,UNTRACKED -j EGRESS-MON\n"
               "-A OUTPUT -d 10.0.0.1/32 -j ACCEPT\n"
               "-A OUTPUT -m conntrack --ctstate INVALID,NEW,UNTRACKED -j EGRESS-MON\n"
               "-A OUTPUT -j EGRESS-MON-NAT\n")

    class Listing(Recorder):
        def __call__(self, argv: Sequence[str], stdin: str | None
                     ) -> subprocess.CompletedProcess[str]:
            done = super().__call__(argv, stdin)
            if "-S" in argv:
                done.stdout = listing
            return done

    rec = Listing()
    Firewall(runner=rec).install()
    v4 = [c[0] for c in rec.calls if c[0][0] == "iptables"]
    first_insert = next(i for i, a in enumerate(v4) if "-I" in a and a[-1] == "EGRESS-MON")
    deletes = [a for a in v4 if "-D" in a]
    assert deletes and all(v4.index(d) > first_insert for d in deletes)
    # Copies 3 (the old EGRESS-MON) is deleted by number, from the bottom; the other
    # table's jump and foreign rules are left alone.
    assert ("iptables", "-w", "-t", "filter", "-D", "OUTPUT", "3") in deletes
    assert ("iptables", "-w", "-t", "filter", "-D", "OUTPUT", "2") not in deletes
    assert not any(a[-1] == "OUTPUT" and "-D" in a for a in v4)  # never a bare -D by spec


def test_sync_failure_names_the_command() -> None:
    with pytest.raises(FirewallError, match="ip6tables-restore"):
        Firewall(runner=Recorder(fail={"ip6tables-restore"})).sync([BuildRule("/b", 1)])


def test_remove_continues_past_a_failing_family() -> None:
    rec = Recorder(fail={"iptables -w -F EGRESS-MON", "-D OUTPUT"})
    errors = Firewall(runner=rec).remove()
    assert errors == ["iptables -F EGRESS-MON: boom", "iptables -F EGRESS-MON-DATA: boom"]
    calls = [c[0] for c in rec.calls]
    assert ("ip6tables", "-w", "-X", "EGRESS-MON") in calls
    assert ("ip6tables", "-w", "-t", "nat", "-X", "EGRESS-MON-NAT") in calls


HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
PURE = "35 24 0:30 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n"


def test_cgroup2_mount_discovery() -> None:
    assert find_cgroup2_mount(HYBRID) == "/sys/fs/cgroup/unified"
    assert find_cgroup2_mount(PURE) == "/sys/fs/cgroup"
    assert find_cgroup2_mount("1 2 0:1 / /proc rw - proc proc rw\n") is None


def test_build_cgroup_names_round_trip() -> None:
    name = build_cgroup_name(31007, "18bcfe56800-24426")
    assert parse_build_cgroup(f"/system.slice/x.service/{name}") == (31007, "18bcfe56800-24426")
    assert build_queue_of(f"/system.slice/x.service/{name}/sub") == 31007
    assert build_queue_of("/system.slice/x.service") is None
    assert parse_build_cgroup("/egress-build-junk") is None


def test_cgroup_bookkeeping_on_a_plain_directory(tmp_path: Path) -> None:
    cg = Cgroups(str(tmp_path))
    (tmp_path / "runner.service").mkdir()
    rel = cg.create("/runner.service", "egress-build-q1-a-1")
    assert rel == "/runner.service/egress-build-q1-a-1"
    (tmp_path / rel.lstrip("/") / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    (tmp_path / rel.lstrip("/") / "cgroup.procs").write_text("12\n13\n")
    assert cg.populated(rel) and cg.procs(rel) == [12, 13]
    assert cg.build_cgroups() == [rel]
    (tmp_path / rel.lstrip("/") / "cgroup.events").write_text("populated 0\n")
    assert not cg.populated(rel) and not cg.populated("/gone")


def test_mark_gate_follows_the_cgroup_rules() -> None:
    """Stamped packets no build cgroup took are gated on the gate's queue, after every
    cgroup rule (a cgroup rule names its build by queue), with the DNS redirect; refusing
    renders refuse them too, and without a gate nothing matches marks but our verdicts."""
    gate = MarkGate(0x80000000, 0x80000000, 31512)
    text = render(RULES, 4, 15353, sink_port=15354, mark_gate=gate)
    lines = text.splitlines()
    stamped = [i for i, line in enumerate(lines) if "0x80000000/0x80000000" in line]
    cgroup = [i for i, line in enumerate(lines) if "-m cgroup" in line]
    assert stamped and all(
        i > max(c for c in cgroup if lines[c].split()[1] == lines[i].split()[1])
        for i in stamped)
    assert "-A EGRESS-MON-NAT -m mark --mark 0x80000000/0x80000000 -p udp --dport 53 -j " \
        "REDIRECT --to-ports 15353" in lines
    assert "-A EGRESS-MON -m mark --mark 0x80000000/0x80000000 ! -p tcp -j NFQUEUE " \
        "--queue-num 31512" in lines
    assert "-A EGRESS-MON-DATA -m mark --mark 0x80000000/0x80000000 -p tcp -j NFQUEUE " \
        "--queue-num 31512" in lines
    refusing = render(RULES, 4, 15353, refuse=True, mark_gate=gate)
    assert "31512" not in refusing
    assert "-A EGRESS-MON -m mark --mark 0x80000000/0x80000000 -j REJECT --reject-with " \
        "icmp-admin-prohibited" in refusing.splitlines()
    assert "0x80000000" not in render(RULES, 4, 15353)
