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
                 sink_port: int | None = None, mark_gate: MarkGate | None = None,
                 late_tcp: bool = False) -> None:
        self.chain = chain
        self.late_tcp = late_tcp  # rules.render's late_tcp: a namespace gate's firewall
        self.mark_gate = mark_gate
        self.nat_chain = nat_chain
        self.resolver_port = resolver_port
        self.sink_port = sink_port
        self._run = runner

    def _render(self, builds: list[BuildRule], family: int, refuse: bool = False) -> str:
        return render(builds, family, self.resolver_port, self.chain, self.nat_chain, refuse,
                      sink_port=self.sink_port, mark_gate=self.mark_gate,
                      late_tcp=self.late_tcp)

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
        for family, tool, restore in FAMILIES:
            self._must([restore, "-w", "--noflush"], self._render(rules, family, refuse))
            for table, spec in self._jumps():
                self._ensure_jump(tool, table, spec)

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
        for family, _tool, restore in FAMILIES:
            self._must([restore, "-w", "--noflush"], self._render(rules, family, refuse))

    def present(self) -> bool:
        """Whether both jumps are still in OUTPUT for both families."""
        return all(
            self._run([tool, "-w", "-t", table, "-C", *spec], None).returncode == 0
            for _family, tool, _ in FAMILIES
            for table, spec in self._jumps()
        )

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
