"""``egress-monitor bpf-check``: can this host run the kernel identity programs?

Loads and attaches everything as the daemon will (``BpfOwner.open``), registers the toolchain
files it finds (``toolchains.register``), checks the programs are in place, then tears it all
down. Returns the exit status and the lines to print: 0 and what was loaded (each registered
file by kind), or 1 and what is missing or in conflict (the message the daemon's start will
give).
"""

from __future__ import annotations

import os

from egress_monitor.bpf.hostmarks import MarkConflict
from egress_monitor.bpf.marks import MarkLayout
from egress_monitor.bpf.owner import BpfOwner, BpfUnavailable
from egress_monitor.bpf.programs import FILE_CARGO, FILE_RUSTC, FILE_TOOL
from egress_monitor.bpf.toolchains import register
from egress_monitor.enforce.cgroups import Cgroups


def run(layout: MarkLayout | None = None) -> tuple[int, list[str]]:
    """Exit status and report lines."""
    layout = layout or MarkLayout()
    try:
        root = Cgroups.discover().mount
    except OSError as e:  # CgroupError included
        return 1, [f"bpf: no cgroup2 hierarchy: {e}"]
    try:
        owner = BpfOwner.open(layout, root)
    except (BpfUnavailable, MarkConflict) as e:
        return 1, [f"bpf: {e}"]
    try:
        done = register(owner, dict(os.environ))
        problems = owner.intact()
        lines = [f"bpf: programs loaded and attached at {root}: "
                 + ", ".join(f"{n} (id {i})" for n, i in owner.prog_ids.items()),
                 f"bpf: reserved mark bits {layout.reserved:#010x}; no host rule uses them"]
        for kind, what in ((FILE_CARGO, "cargo"), (FILE_RUSTC, "rustc"), (FILE_TOOL, "tool")):
            files = [p for p, k in done if k == kind]
            lines.append(f"bpf: {len(files)} toolchain {what} file(s): "
                         + (", ".join(files) or "none"))
        if problems:
            return 1, lines + [f"bpf: {p}" for p in problems]
        return 0, [*lines, "bpf: ok (everything detached again)"]
    finally:
        owner.close()
