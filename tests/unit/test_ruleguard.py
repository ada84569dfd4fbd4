"""Rules compared by content (rulecheck) and the guard's baseline, detection and restore
(ruleguard), on iptables-save text captured on this machine with one build's rules."""

from __future__ import annotations

from pathlib import Path

from egress_monitor.enforce.rules import BuildRule, render
from egress_monitor.rulecheck import (
    differences,
    expected_rules,
    parse_save,
    target_of,
    unsound,
)
from egress_monitor.ruleguard import RuleGuard
from egress_monitor.sources.nfgen import Commit

CHAINS = frozenset({"EGRESS-MON", "EGRESS-MON-DATA", "EGRESS-MON-NAT"})
JUMPS = {"filter": frozenset({"EGRESS-MON", "EGRESS-MON-DATA"}),
         "nat": frozenset({"EGRESS-MON-NAT"})}
# ``iptables-save -t filter; iptables-save -t nat`` after Firewall.install of one build.
SAVED = Path(__file__).with_name("iptables_save_v4.txt").read_text()
WRITTEN = render([BuildRule("/em-tamper-capture", 31000)], 4, 15353, sink_port=15354)


def edit(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


def test_a_fresh_install_is_sound_and_the_same_as_itself() -> None:
    views = parse_save(SAVED, 4, CHAINS)
    assert [v.table for v in views] == ["filter", "nat"]
    assert len(views[0].rules("EGRESS-MON") or ()) == 7 and len(views[1].top) == 1
    assert unsound(views, expected_rules(WRITTEN), JUMPS) == []
    assert differences(views, parse_save(SAVED, 4, CHAINS)) == []
    assert target_of('-A X -m comment --comment "-j Y" -j Z') == "Z"


def test_each_kind_of_change_is_named() -> None:
    before = parse_save(SAVED, 4, CHAINS)
    jump = "-A OUTPUT -j EGRESS-MON-NAT\n"
    cases = {
        "jump removed": edit(SAVED, jump, ""),
        "rule above": edit(SAVED, jump, "-A OUTPUT -j ACCEPT\n" + jump),
        "flushed": "\n".join(line for line in SAVED.splitlines()
                             if not line.startswith("-A EGRESS-MON-NAT")),
        "deleted": edit(SAVED, ":EGRESS-MON-DATA - [0:0]\n", ""),
        "changed": edit(SAVED, "--queue-num 31000\n-A EGRESS-MON-DATA -p tcp -m mark",
                        "--queue-num 31001\n-A EGRESS-MON-DATA -p tcp -m mark"),
    }
    said = {k: " | ".join(differences(before, parse_save(v, 4, CHAINS)))
            for k, v in cases.items()}
    assert said["jump removed"] == ("ipv4 nat: jump removed from OUTPUT: "
                                    "-A OUTPUT -j EGRESS-MON-NAT")
    assert said["rule above"] == "ipv4 nat: rule(s) above our jump in OUTPUT: -A OUTPUT -j ACCEPT"
    assert said["flushed"] == "ipv4 nat: chain EGRESS-MON-NAT flushed (6 rules gone)"
    assert said["deleted"] == "ipv4 filter: chain EGRESS-MON-DATA deleted"
    assert "1 rule(s) removed from EGRESS-MON" in said["changed"]
    assert "1 rule(s) added to EGRESS-MON" in said["changed"]


def test_harmless_rules_above_and_other_rules_below_are_not_differences() -> None:
    before = parse_save(SAVED, 4, CHAINS)
    jump = "-A OUTPUT -j EGRESS-MON-NAT\n"
    logged = edit(SAVED, jump, "-A OUTPUT -p udp -j LOG\n" + jump + "-A OUTPUT -j ACCEPT\n")
    assert differences(before, parse_save(logged, 4, CHAINS)) == []
    # A chain of ours appearing where there was none is not ours to complain about.
    assert differences((), before) == []


def test_unsound_read_backs() -> None:
    counts = expected_rules(WRITTEN)
    assert counts[("nat", "EGRESS-MON-NAT")] == 6 and counts[("filter", "EGRESS-MON")] == 7
    flushed = "\n".join(line for line in SAVED.splitlines()
                        if not line.startswith("-A EGRESS-MON "))
    assert unsound(parse_save(flushed, 4, CHAINS), counts, JUMPS) == [
        "ipv4 filter: chain EGRESS-MON flushed (7 rules written, none left)"]
    moved = edit(SAVED, "-A OUTPUT -j EGRESS-MON-NAT\n",
                 "-A OUTPUT -j ACCEPT\n-A OUTPUT -j EGRESS-MON-NAT\n")
    assert unsound(parse_save(moved, 4, CHAINS), counts, JUMPS) == [
        "ipv4 nat: rule(s) above our jump in OUTPUT: -A OUTPUT -j ACCEPT"]
    gone = edit(SAVED, "-A OUTPUT -j EGRESS-MON-NAT\n", "")
    assert unsound(parse_save(gone, 4, CHAINS), counts, JUMPS) == [
        "ipv4 nat: jump removed from OUTPUT: to EGRESS-MON-NAT"]
    twice = edit(SAVED, "-A OUTPUT -j EGRESS-MON-NAT\n",
                 "-A OUTPUT -j EGRESS-MON-NAT\n-A OUTPUT -j EGRESS-MON-NAT\n")
    assert unsound(parse_save(twice, 4, CHAINS), counts, JUMPS) == [
        "ipv4 nat: our jumps duplicated in OUTPUT"]


def test_parse_save_is_total() -> None:
    for text in ("", "*filter\n-A\n:\nCOMMIT\n", '-A OUTPUT -j "unterminated\n', "*nat\n" * 3,
                 "*filter\n-A OUTPUT -j\n-A OUTPUT -g\n"):
        parse_save(text, 6, CHAINS)


class FakeGen:
    def __init__(self) -> None:
        self.gen = 1
        self.pending: list[Commit] = []

    def commit(self, pid: int, comm: str) -> None:
        self.gen += 1
        self.pending.append(Commit(self.gen, pid, comm))

    def current(self) -> int:
        return self.gen

    def commits(self) -> tuple[list[Commit], bool]:
        out, self.pending = self.pending, []
        return out, False


class Host:
    """The kernel's ruleset as the guard sees it, and the daemon's install."""

    def __init__(self, gen: FakeGen | None) -> None:
        self.text = {4: SAVED, 6: SAVED.replace("127.0.0.1/32", "::1/128")}
        self.gen = gen
        self.reads = 0
        self.restores = 0
        self.guard = RuleGuard(save=self.save, restore=self.restore, chains=CHAINS,
                               jumps=JUMPS, generation=gen)  # type: ignore[arg-type]

    def save(self, family: int) -> str:
        self.reads += 1
        return self.text[family]

    def restore(self) -> None:
        self.restores += 1
        self.text = {4: SAVED, 6: SAVED.replace("127.0.0.1/32", "::1/128")}
        if self.gen is not None:
            self.gen.commit(1, "iptables-restor")
        self.guard.ours({4: WRITTEN, 6: WRITTEN})

    def tamper(self, family: int, new: str) -> None:
        self.text[family] = new
        if self.gen is not None:
            self.gen.commit(4242, "iptables")


def test_the_guard_reads_only_on_a_change_and_restores_what_differs() -> None:
    gen = FakeGen()
    host = Host(gen)
    gen.commit(1, "iptables-restor")  # our own install
    host.guard.ours({4: WRITTEN, 6: WRITTEN})
    assert host.guard.check() is None and host.reads == 2  # the baseline
    assert host.guard.check() is None and host.reads == 2  # nothing changed: no read
    host.tamper(6, edit(host.text[6], "-A OUTPUT -j EGRESS-MON-NAT\n", ""))
    found = host.guard.check()
    assert found is not None and found.restored and host.restores == 1
    assert found.differences == ("ipv6 nat: jump removed from OUTPUT: "
                                 "-A OUTPUT -j EGRESS-MON-NAT",)
    assert found.committers == (Commit(3, 4242, "iptables"),)
    assert host.guard.check() is None  # the restore itself is ours: no alert
    reads = host.reads
    gen.commit(77, "nft")  # someone else's change elsewhere: read, no difference
    assert host.guard.check() is None and host.reads == reads + 2


def test_a_change_right_after_ours_is_caught_by_the_soundness_check() -> None:
    gen = FakeGen()
    host = Host(gen)
    host.guard.ours({4: WRITTEN, 6: WRITTEN})
    host.tamper(4, "\n".join(line for line in SAVED.splitlines()
                             if not line.startswith("-A EGRESS-MON-NAT")))
    found = host.guard.check()
    assert found is not None and found.differences == (
        "ipv4 nat: chain EGRESS-MON-NAT flushed (6 rules written, none left)",)
    assert [c.pid for c in found.committers] == [4242]


def test_without_generations_the_guard_reads_back_every_time() -> None:
    host = Host(None)
    host.guard.ours({4: WRITTEN, 6: WRITTEN})
    assert host.guard.detector == "read-back"
    assert host.guard.check() is None and host.guard.check() is None and host.reads == 4
    host.tamper(4, edit(SAVED, "-A OUTPUT -j EGRESS-MON-NAT\n", ""))
    found = host.guard.check()
    assert found is not None and found.committers == () and found.restored


def test_our_failed_write_is_taken_as_it_is() -> None:
    host = Host(FakeGen())
    host.tamper(4, edit(SAVED, "-A OUTPUT -j EGRESS-MON-NAT\n", ""))
    host.guard.ours(None)  # a command failed part-way: no text to hold the rules to
    assert host.guard.check() is None and host.restores == 0


def test_a_restore_undone_at_once_is_restored_again_next_time() -> None:
    gen = FakeGen()
    host = Host(gen)
    host.guard.ours({4: WRITTEN, 6: WRITTEN})
    assert host.guard.check() is None
    gone = edit(SAVED, "-A OUTPUT -j EGRESS-MON-NAT\n", "")
    restore = host.restore

    def undone() -> None:  # the attacker deletes the jump again while we write
        restore()
        host.text[4] = gone
    host.guard._restore = undone
    host.tamper(4, gone)
    found = host.guard.check()
    assert found is not None and found.restored is False
    host.guard._restore = restore
    again = host.guard.check()  # not taken as the baseline: held to what was written
    assert again is not None and again.restored is True
    assert again.differences == ("ipv4 nat: jump removed from OUTPUT: to EGRESS-MON-NAT",)
