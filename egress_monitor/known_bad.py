"""Known-bad crates at build time (pure): which exec compiles or runs a listed crate.

Checked at every exec of a build member whose role carries a crate: ``rustc`` compiling it
(a proc macro is compiled like any crate, before it runs inside the rustc of the crates that
use it), its build script, and its crate binaries (tests, benches, ``cargo run``). A child
running the same code as its parent (a build script's ``sh``, rustc's linker) is not a new
occasion. Each build gets one alert per crate, version and role.
"""

from __future__ import annotations

from collections import OrderedDict

from egress_monitor.iocs import CrateIndicator, Indicators
from egress_monitor.process_tree import Node
from egress_monitor.roles import Role

CHECKED_ROLES = frozenset({Role.RUSTC, Role.BUILD_SCRIPT, Role.CRATE_BINARY})
STAGE = {Role.RUSTC: "compile", Role.BUILD_SCRIPT: "build-script", Role.CRATE_BINARY: "run"}
MAX_SEEN = 65536


class KnownBadWatch:
    """The indicators, and what was already reported."""

    def __init__(self, indicators: Indicators) -> None:
        self.indicators = indicators
        self._seen: OrderedDict[tuple[str, str, str | None, Role], None] = OrderedDict()

    def check(self, node: Node) -> CrateIndicator | None:
        """The indicator a build member's exec hits, the first time it does, else None."""
        if node.build is None or node.crate is None or node.role not in CHECKED_ROLES:
            return None
        parent = node.parent
        if parent is not None and parent.role is node.role and parent.crate == node.crate:
            return None
        hit = self.indicators.crate(node.crate.name, node.crate.version)
        if hit is None:
            return None
        key = (node.build.id, node.crate.name, node.crate.version, node.role)
        if key in self._seen:
            return None
        self._seen[key] = None
        while len(self._seen) > MAX_SEEN:
            self._seen.popitem(last=False)
        return hit
