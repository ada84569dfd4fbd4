"""Apply and remove the rendered ruleset with iptables and ip6tables.

Each family is handled alone and each undo step is isolated, so one failure never leaves
the other family's rules behind. ``runner`` is injected for tests of the command lines.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable, Iterable, Sequence

from egress_monitor.enforce.rules import CHAIN, BuildRule, jump_spec, render

log = logging.getLogger(__name__)
Runner = Callable[[Sequence[str], str | None], subprocess.CompletedProcess[str]]
FAMILIES = (("iptables", "iptables-restore"), ("ip6tables", "ip6tables-restore"))


class FirewallError(RuntimeError):
    """An iptables command failed; the message carries its stderr."""


def run_command(argv: Sequence[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
    """Run one command, capturing output (the default runner)."""
    return subprocess.run(list(argv), input=stdin, capture_output=True, text=True, check=False)


class Firewall:
    """The daemon's own chain in both families."""

    def __init__(self, chain: str = CHAIN, runner: Runner = run_command) -> None:
        self.chain = chain
        self._run = runner

    def _must(self, argv: Sequence[str], stdin: str | None = None) -> str:
        result = self._run(argv, stdin)
        if result.returncode != 0:
            raise FirewallError(f"{' '.join(argv)}: {result.stderr.strip()}")
        return result.stdout

    def install(self) -> None:
        """Create the (empty) chain and exactly one jump to it at the top of OUTPUT."""
        for tool, restore in FAMILIES:
            self._must([restore, "-w", "--noflush"], render([], self.chain))
            self._drop_jumps(tool)
            spec = jump_spec(self.chain)
            self._must([tool, "-w", "-I", spec[0], "1", *spec[1:]])

    def sync(self, builds: Iterable[BuildRule]) -> None:
        """Make the chain hold exactly the rules for ``builds``, atomically per family."""
        text = render(list(builds), self.chain)
        for _tool, restore in FAMILIES:
            self._must([restore, "-w", "--noflush"], text)

    def present(self) -> bool:
        """Whether a jump to the chain is still in OUTPUT for both families."""
        return all(
            self._run([tool, "-w", "-C", *jump_spec(self.chain)], None).returncode == 0
            for tool, _ in FAMILIES
        )

    def _drop_jumps(self, tool: str) -> None:
        # Both the current jump and the bare form older versions installed.
        for spec in (jump_spec(self.chain), ["OUTPUT", "-j", self.chain]):
            for _ in range(16):  # bounded: each call removes one copy
                if self._run([tool, "-w", "-D", *spec], None).returncode:
                    break

    def remove(self) -> list[str]:
        """Remove jump and chain in both families; returns the errors met (logged too)."""
        errors = []
        for tool, _restore in FAMILIES:
            self._drop_jumps(tool)
            for step in (["-F", self.chain], ["-X", self.chain]):
                result = self._run([tool, "-w", *step], None)
                if result.returncode and "No chain" not in result.stderr \
                        and "does not exist" not in result.stderr:
                    msg = f"{tool} {' '.join(step)}: {result.stderr.strip()}"
                    log.error("firewall cleanup: %s", msg)
                    errors.append(msg)
        return errors
