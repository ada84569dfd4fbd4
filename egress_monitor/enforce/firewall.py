"""Apply and remove the rendered ruleset with iptables and ip6tables.

Each family is handled alone and each undo step is isolated, so one failure never leaves
the other family's rules behind. ``runner`` is injected for tests of the command lines.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable, Iterable, Sequence

from egress_monitor.enforce.rules import (
    CHAIN,
    DATA_CHAIN,
    NAT_CHAIN,
    BuildRule,
    MarkGate,
    data_jump_spec,
    jump_spec,
    nat_jump_spec,
    render,
)

log = logging.getLogger(__name__)
Runner = Callable[[Sequence[str], str | None], subprocess.CompletedProcess[str]]
FAMILIES = ((4, "iptables", "iptables-restore"), (6, "ip6tables", "ip6tables-restore"))


class FirewallError(RuntimeError):
    """An iptables command failed; the message carries its stderr."""


def run_command(argv: Sequence[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
    """Run one command, capturing output (the default runner)."""
    return subprocess.run(list(argv), input=stdin, capture_output=True, text=True, check=False)


class Firewall:
    """The daemon's own chain in both families."""

    def __init__(self, chain: str = CHAIN, runner: Runner = run_command,
                 resolver_port: int | None = None, nat_chain: str = NAT_CHAIN,
                 sink_port: int | None = None, mark_gate: MarkGate | None = None) -> None:
        self.chain = chain
        self.mark_gate = mark_gate
        self.nat_chain = nat_chain
        self.resolver_port = resolver_port
        self.sink_port = sink_port
        self._run = runner
        # Called after every install or sync, with the text written per family (None when a
        # command failed part-way): the rule guard reads the rules back then, so the daemon's
        # own changes are never taken for tampering.
        self.on_change: Callable[[dict[int, str] | None], None] | None = None

    def _changed(self, written: dict[int, str] | None) -> None:
        if self.on_change is not None:
            self.on_change(written)

    def _render(self, builds: list[BuildRule], family: int, refuse: bool = False) -> str:
        return render(builds, family, self.resolver_port, self.chain, self.nat_chain, refuse,
                      sink_port=self.sink_port, mark_gate=self.mark_gate)

    def _must(self, argv: Sequence[str], stdin: str | None = None) -> str:
        result = self._run(argv, stdin)
        if result.returncode != 0:
            raise FirewallError(f"{' '.join(argv)}: {result.stderr.strip()}")
        return result.stdout

    def install(self, builds: Iterable[BuildRule] = (), refuse: bool = False) -> None:
        """Create the chains, holding the rules for ``builds`` (refusing with ``refuse``), and
        exactly one jump to each at the top of OUTPUT.

        A restarted daemon passes the builds a previous one left, refusing: chains that held
        their rules never go through an empty state, in which their traffic would pass.
        """
        rules = list(builds)
        written: dict[int, str] | None = None
        try:
            texts = {family: self._render(rules, family, refuse) for family, _t, _r in FAMILIES}
            for family, tool, restore in FAMILIES:
                self._must([restore, "-w", "--noflush"], texts[family])
                for table, spec in self._jumps():
                    self._ensure_jump(tool, table, spec)
            written = texts
        finally:
            self._changed(written)

    def _ensure_jump(self, tool: str, table: str, spec: list[str]) -> None:
        """Exactly one copy of a jump, at the top, with at least one in place throughout:
        the new copy goes in first, then older copies (further down) are deleted by number,
        so a restart or a reconcile never has a moment with no jump to our chains."""
        self._must([tool, "-w", "-t", table, "-I", spec[0], "1", *spec[1:]])
        target = spec[-1]
        listing = self._must([tool, "-w", "-t", table, "-S", spec[0]])
        rules = [line.split() for line in listing.splitlines() if line.startswith("-A ")]
        extra = [n for n, words in enumerate(rules, start=1)
                 if n > 1 and words[-2:] == ["-j", target]]
        for number in reversed(extra):  # from the bottom, so the numbers stay right
            self._must([tool, "-w", "-t", table, "-D", spec[0], str(number)])

    def sync(self, builds: Iterable[BuildRule], refuse: bool = False) -> None:
        """Make the chains hold exactly the rules for ``builds``, atomically per family;
        ``refuse`` refuses their new flows instead of queueing them (daemon down)."""
        rules = list(builds)
        written: dict[int, str] | None = None
        try:
            texts = {family: self._render(rules, family, refuse) for family, _t, _r in FAMILIES}
            for family, _tool, restore in FAMILIES:
                self._must([restore, "-w", "--noflush"], texts[family])
            written = texts
        finally:
            self._changed(written)

    def present(self) -> bool:
        """Whether both jumps are still in OUTPUT for both families."""
        return all(
            self._run([tool, "-w", "-t", table, "-C", *spec], None).returncode == 0
            for _family, tool, _ in FAMILIES
            for table, spec in self._jumps()
        )

    def rendered(self, builds: Iterable[BuildRule], family: int) -> str:
        """The text :meth:`sync` writes for ``family`` (what the rule guard holds it to)."""
        return self._render(list(builds), family)

    def chains(self) -> frozenset[str]:
        """Our chains' names (both tables)."""
        return frozenset({self.chain, DATA_CHAIN, self.nat_chain})

    def jump_targets(self) -> dict[str, frozenset[str]]:
        """Table -> the chains OUTPUT jumps to at its top."""
        out: dict[str, set[str]] = {}
        for table, spec in self._jumps():
            out.setdefault(table, set()).add(spec[-1])
        return {table: frozenset(chains) for table, chains in out.items()}

    def save(self, family: int) -> str:
        """``iptables-save`` (``ip6tables-save``) of the filter and nat tables, as one text."""
        tool = "iptables-save" if family == 4 else "ip6tables-save"
        return "".join(self._must([tool, "-t", table]) for table in ("filter", "nat"))

    def backend(self) -> str:
        """``nf_tables`` or ``legacy``: what ``iptables -V`` says it drives."""
        return "nf_tables" if "nf_tables" in self._must(["iptables", "-V"]) else "legacy"

    def _jumps(self) -> list[tuple[str, list[str]]]:
        return [("filter", jump_spec(self.chain)), ("filter", data_jump_spec(DATA_CHAIN)),
                ("nat", nat_jump_spec(self.nat_chain))]

    def _drop_jumps(self, tool: str) -> None:
        # The bare filter form is what version 0.1.0's first commits installed.
        for table, spec in [*self._jumps(), ("filter", ["OUTPUT", "-j", self.chain])]:
            for _ in range(16):  # bounded: each call removes one copy
                if self._run([tool, "-w", "-t", table, "-D", *spec], None).returncode:
                    break

    def remove(self) -> list[str]:
        """Remove jumps and chains in both families; returns the errors met (logged too)."""
        errors = []
        for _family, tool, _restore in FAMILIES:
            self._drop_jumps(tool)
            for step in (["-F", self.chain], ["-X", self.chain], ["-F", DATA_CHAIN],
                         ["-X", DATA_CHAIN], ["-t", "nat", "-F", self.nat_chain],
                         ["-t", "nat", "-X", self.nat_chain]):
                result = self._run([tool, "-w", *step], None)
                if result.returncode and "No chain" not in result.stderr \
                        and "does not exist" not in result.stderr:
                    msg = f"{tool} {' '.join(step)}: {result.stderr.strip()}"
                    log.error("firewall cleanup: %s", msg)
                    errors.append(msg)
        return errors
