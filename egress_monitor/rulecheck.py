"""Our firewall rules compared by content (pure): what ``iptables-save`` says of them.

The daemon reads its rules back after each change it makes (``ruleguard.py``) and keeps a
:class:`TableView` per family and table (filter, nat): the rules of its own chains, in order,
and the top of ``OUTPUT`` down to the last jump to one of them. When anything changes in the
ruleset it reads them again and :func:`differences` says, in words for the alert, what is
no longer as it was: a chain deleted or flushed, a rule removed, added or changed, a jump
removed, or a rule put above a jump (which could ACCEPT a packet before our chain sees it).

Rules above our jumps that can only drop or log a packet (``DROP``, ``REJECT``, ``LOG``,
``NFLOG``) are left out of the view: they cannot let anything past us, and another tool
adding one must not make the daemon fight it every second.

Total: :func:`parse_save` takes any text (lines it cannot read are skipped).
"""

from __future__ import annotations

import shlex
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

TABLES = ("filter", "nat")
HARMLESS = frozenset({"DROP", "REJECT", "LOG", "NFLOG"})
MAX_SHOWN = 3  # rules quoted per difference


@dataclass(frozen=True, slots=True)
class TableView:
    """One table of one family as far as the daemon's rules are concerned."""

    family: int
    table: str
    chains: tuple[tuple[str, tuple[str, ...]], ...]  # ours, by name, rules in order
    top: tuple[str, ...]  # OUTPUT's rules through the last jump to ours (harmless left out)
    jumps: tuple[str, ...]  # OUTPUT's jumps to ours, wherever they are

    def rules(self, chain: str) -> tuple[str, ...] | None:
        """The rules of one of our chains, or None when it does not exist."""
        return next((rules for name, rules in self.chains if name == chain), None)


def _words(line: str) -> list[str]:
    if not any(q in line for q in "\"'\\"):
        return line.split()  # no quoting: the common case, and linear
    try:
        return shlex.split(line)
    except ValueError:
        return line.split()


def target_of(line: str) -> str | None:
    """The ``-j``/``-g`` target of a rule line, or None."""
    words = _words(line)
    for flag in ("-j", "-g", "--jump", "--goto"):
        if flag in words:
            i = words.index(flag)
            return words[i + 1] if i + 1 < len(words) else None
    return None


def parse_save(text: str, family: int, chains: Collection[str],
               tables: Iterable[str] = TABLES) -> tuple[TableView, ...]:
    """The views of ``tables`` in an ``iptables-save`` text, for our ``chains``; a table the
    text does not list gets an empty view (nothing of ours in it)."""
    declared: dict[str, set[str]] = {}
    rules: dict[str, dict[str, list[str]]] = {}
    table = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            table = line[1:]
            declared.setdefault(table, set())
            rules.setdefault(table, {})
        elif table is None or not line or line.startswith("#"):
            continue
        elif line == "COMMIT":
            table = None
        elif line.startswith(":"):
            declared[table].add(line[1:].split(" ", 1)[0])
        elif line.startswith("-A "):
            chain = line[3:].split(" ", 1)[0]
            rules[table].setdefault(chain, []).append(" ".join(line.split()))
    views = []
    for name in tables:
        ours = tuple((c, tuple(rules.get(name, {}).get(c, ())))
                     for c in sorted(declared.get(name, set()) & set(chains)))
        output = [(r, target_of(r)) for r in rules.get(name, {}).get("OUTPUT", [])]
        jumps = tuple(r for r, t in output if t in chains)
        last = max((i for i, (_r, t) in enumerate(output) if t in chains), default=-1)
        top = tuple(r for r, t in output[:last + 1] if t not in HARMLESS)
        views.append(TableView(family, name, ours, top, jumps))
    return tuple(views)


def _quote(lines: Iterable[str]) -> str:
    shown = list(lines)
    text = "; ".join(shown[:MAX_SHOWN])
    return text + (f" (+{len(shown) - MAX_SHOWN} more)" if len(shown) > MAX_SHOWN else "")


def _chain_changes(where: str, name: str, before: tuple[str, ...],
                   after: tuple[str, ...] | None) -> list[str]:
    if after is None:
        return [f"{where}: chain {name} deleted"]
    if before == after:
        return []
    if before and not after:
        return [f"{where}: chain {name} flushed ({len(before)} rules gone)"]
    had, has = set(before), set(after)
    removed = [r for r in before if r not in has]
    added = [r for r in after if r not in had]
    if not removed and not added:
        return [f"{where}: chain {name} reordered"]
    out = []
    if removed:
        out.append(f"{where}: {len(removed)} rule(s) removed from {name}: {_quote(removed)}")
    if added:
        out.append(f"{where}: {len(added)} rule(s) added to {name}: {_quote(added)}")
    return out


def _view_changes(before: TableView, after: TableView | None) -> list[str]:
    where = f"ipv{before.family} {before.table}"
    after = after or TableView(before.family, before.table, (), (), ())
    out = []
    for name, rules in before.chains:
        out += _chain_changes(where, name, rules, after.rules(name))
    if before.top != after.top:
        jumps, top = set(after.jumps), set(before.top)
        gone = [r for r in before.jumps if r not in jumps]
        above = [r for r in after.top if r not in top]
        if gone:
            out.append(f"{where}: jump removed from OUTPUT: {_quote(gone)}")
        if above:
            out.append(f"{where}: rule(s) above our jump in OUTPUT: {_quote(above)}")
        if not gone and not above:
            out.append(f"{where}: our jumps moved in OUTPUT")
    return out


def differences(before: Iterable[TableView], after: Iterable[TableView]) -> list[str]:
    """What in ``after`` differs from ``before`` (empty: the same); chains of ours that
    appear only in ``after`` are not a difference."""
    now = {(v.family, v.table): v for v in after}
    out = []
    for view in before:
        out += _view_changes(view, now.get((view.family, view.table)))
    return out


def expected_rules(restore_text: str) -> dict[tuple[str, str], int]:
    """``(table, chain) -> number of rules`` that an ``iptables-restore`` text puts in each
    chain it declares (``rules.render``'s output)."""
    counts: dict[tuple[str, str], int] = {}
    table = ""
    for raw in restore_text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":"):
            counts.setdefault((table, line[1:].split(" ", 1)[0]), 0)
        elif line.startswith("-A "):
            key = (table, line[3:].split(" ", 1)[0])
            counts[key] = counts.get(key, 0) + 1
    return counts


def unsound(views: Iterable[TableView], counts: Mapping[tuple[str, str], int],
            jumps: Mapping[str, Collection[str]]) -> list[str]:
    """What in freshly read ``views`` of one family does not match what the daemon just
    wrote: each chain's number of rules (``counts``, from :func:`expected_rules`) and, at the
    very top of OUTPUT, exactly one jump to each chain of ``jumps`` (table -> chains)."""
    out = []
    for view in views:
        where = f"ipv{view.family} {view.table}"
        for (table, chain), n in sorted(counts.items()):
            if table != view.table:
                continue
            rules = view.rules(chain)
            if rules is None:
                out.append(f"{where}: chain {chain} deleted")
            elif n and not rules:
                out.append(f"{where}: chain {chain} flushed ({n} rules written, none left)")
            elif len(rules) != n:
                out.append(f"{where}: chain {chain} has {len(rules)} rules, {n} written")
        want = set(jumps.get(view.table, ()))
        targets = [str(target_of(r)) for r in view.top]
        missing = sorted(want - set(targets))
        above = [r for r in view.top if target_of(r) not in want]
        if missing:
            out.append(f"{where}: jump removed from OUTPUT: to {', '.join(missing)}")
        if above:
            out.append(f"{where}: rule(s) above our jump in OUTPUT: {_quote(above)}")
        if len(targets) - len(above) != len(set(targets) & want):
            out.append(f"{where}: our jumps duplicated in OUTPUT")
    return out
