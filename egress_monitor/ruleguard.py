"""Keep our firewall rules as the daemon wrote them: compare by content, restore at once.

After every install or sync (``Firewall.on_change``, :meth:`RuleGuard.ours`) the guard reads
our rules back once (``iptables-save``, ``ip6tables-save``: tables filter and nat), checks that
what is there is what was written (each chain's rule count, our jumps alone at the top of
OUTPUT: ``rulecheck.unsound``) and keeps it as the baseline. Each :meth:`check` (every second)
first asks whether anything changed at all: with the nf_tables backend, the nftables commit
notifications since the last check (``sources/nfgen.py``: none, nothing to do); otherwise it
reads the rules back each time. On a change it reads them and compares with the baseline
(``rulecheck.differences``); any difference is restored (``restore``: the daemon's install of
its current rules) and returned as a :class:`RuleTamper`, naming who committed the change
when the kernel said.

Our own commits are the ones up to the generation asked right after our change; a commit by
someone else in the moment between our last command and that question is taken for ours,
but then the read-back's soundness check still catches a chain or jump that is not as
written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from egress_monitor.rulecheck import (
    TableView,
    differences,
    expected_rules,
    parse_save,
    unsound,
)
from egress_monitor.sources.nfgen import Commit, NftGeneration

log = logging.getLogger(__name__)
FAMILIES = (4, 6)
MAX_COMMITTERS = 8


@dataclass(frozen=True, slots=True)
class RuleTamper:
    """Our rules were changed by someone else: what differed, who committed, whether the
    daemon's rules are back."""

    differences: tuple[str, ...]
    committers: tuple[Commit, ...]
    restored: bool


class RuleGuard:
    """Baseline, change detection and restore for the daemon's chains and jumps."""

    def __init__(self, *, save: Callable[[int], str], restore: Callable[[], None],
                 chains: Collection[str], jumps: Mapping[str, Collection[str]],
                 generation: NftGeneration | None) -> None:
        self._save = save
        self._restore = restore
        self._chains = frozenset(chains)
        self._jumps = jumps
        self._gen = generation
        self._baseline: tuple[TableView, ...] | None = None
        self._written: dict[int, str] | None = None
        self._pending = True  # read back at the next check
        self._dirty = False  # a change was noticed but not yet compared (a read failed)
        self._ours = -1  # commits up to this generation are ours

    @property
    def detector(self) -> str:
        """How changes are noticed: ``nftables-generation`` or ``read-back``."""
        return "nftables-generation" if self._gen is not None else "read-back"

    def ours(self, written: dict[int, str] | None) -> None:
        """The daemon just changed its rules (``written``: the text per family, None when a
        command failed part-way): take the next read-back as the baseline."""
        self._pending = True
        self._written = written
        if self._gen is not None:
            current = self._gen.current()
            self._ours = current if current is not None else self._ours
        log.debug("rule guard: our change, generation %d", self._ours)

    def _read(self) -> tuple[TableView, ...]:
        return tuple(v for family in FAMILIES
                     for v in parse_save(self._save(family), family, self._chains))

    def check(self) -> RuleTamper | None:
        """Once a second: a change by someone else to our rules, restored; else None."""
        foreign, lost = self._foreign()
        self._dirty = self._dirty or bool(foreign) or lost
        if not self._pending and not self._dirty:
            return None
        now = self._read()  # raises on a failed read: still dirty, compared next time
        self._dirty = False
        if self._pending:
            found = self._soundness(now)
        else:
            assert self._baseline is not None
            found = differences(self._baseline, now)
        # A change made while we read (a read takes four commands) is in the view, or not;
        # either way its committer is named now, and what we did not see is read next time.
        late, lost = self._foreign()
        if not found:
            self._baseline, self._pending = now, False
            self._dirty = bool(late) or lost
            return None
        restored = self._put_back()
        return RuleTamper(tuple(found), _dedupe(foreign + late), restored)

    def _foreign(self) -> tuple[tuple[Commit, ...], bool]:
        """Commits since the last call that are not ours, and whether some were lost."""
        if self._gen is None:
            return (), True  # nothing tells us: read back every time
        commits, lost = self._gen.commits()
        if commits:
            log.debug("rule guard: commits %s (ours up to %d)", commits, self._ours)
        foreign = tuple(c for c in commits if c.generation > self._ours)
        if commits:
            self._ours = max(self._ours, *(c.generation for c in commits))
        return foreign, lost

    def _soundness(self, now: tuple[TableView, ...]) -> list[str]:
        if self._written is None:
            return []  # our own write failed part-way: nothing to hold it against
        found = []
        for family, text in self._written.items():
            found += unsound([v for v in now if v.family == family], expected_rules(text),
                             self._jumps)
        return found

    def _put_back(self) -> bool:
        """Restore, then take the read-back as the new baseline when it is as written."""
        try:
            self._restore()  # calls ours() through Firewall.on_change
            now = self._read()
        except Exception:
            log.exception("restoring the firewall rules")
            self._pending = True
            return False
        left = self._soundness(now)
        if left:
            # Someone changed them again while we wrote: not a baseline; read, hold to what
            # was written and restore again at the next check.
            log.error("firewall rules are still not as written after a restore: %s",
                      "; ".join(left))
            self._pending = True
            return False
        self._baseline, self._pending = now, False
        return True


def _dedupe(commits: tuple[Commit, ...]) -> tuple[Commit, ...]:
    seen: dict[tuple[int | None, str | None], Commit] = {}
    for c in commits:
        seen.setdefault((c.pid, c.comm), c)
    return tuple(seen.values())[:MAX_COMMITTERS]
