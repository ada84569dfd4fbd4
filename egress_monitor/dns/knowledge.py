"""Which names an address stands for, per build, for as long as the answer said (pure).

An answer makes "address X is name N (and every name on its CNAME chain)" true for that build
until the answer's TTL, clamped to ``[min_ttl_s, max_ttl_s]``, plus ``overlap_s`` (a client may
use an address a little after its record expired). Entries are removed when they expire, so
memory is bounded by what builds resolved in the last ``max_ttl_s + overlap_s``.
"""

from __future__ import annotations

import heapq
import ipaddress
from collections.abc import Iterable

NS = 1_000_000_000


class Knowledge:
    """Name <-> address knowledge with expiry; the clock is passed in (``now_ns``)."""

    def __init__(self, min_ttl_s: int = 10, max_ttl_s: int = 3600, overlap_s: int = 10) -> None:
        if not 0 <= min_ttl_s <= max_ttl_s:
            raise ValueError("need 0 <= min_ttl_s <= max_ttl_s")
        self.min_ttl_s, self.max_ttl_s, self.overlap_s = min_ttl_s, max_ttl_s, overlap_s
        self._entries: dict[tuple[str, str], dict[str, int]] = {}
        self._expiry: list[tuple[int, str, str, str]] = []

    def learn(self, build_id: str, addresses: Iterable[str], names: Iterable[str], ttl_s: int,
              now_ns: int) -> int:
        """Record an answer; returns the expiry (ns) it was given."""
        ttl = min(max(ttl_s, self.min_ttl_s), self.max_ttl_s)
        expiry = now_ns + (ttl + self.overlap_s) * NS
        names = tuple(names)
        for address in addresses:
            key = (build_id, str(ipaddress.ip_address(address)))
            known = self._entries.setdefault(key, {})
            for name in names:
                if known.get(name, 0) < expiry:
                    known[name] = expiry
                    heapq.heappush(self._expiry, (expiry, key[0], key[1], name))
        return expiry

    def names(self, build_id: str, address: str, now_ns: int) -> tuple[str, ...]:
        """Names the address currently stands for in this build, in the order learned."""
        known = self._entries.get((build_id, address))
        if not known:
            return ()
        return tuple(name for name, expiry in known.items() if expiry > now_ns)

    def expire(self, now_ns: int) -> int:
        """Remove what has expired; returns how many entries went."""
        removed = 0
        while self._expiry and self._expiry[0][0] <= now_ns:
            expiry, build_id, address, name = heapq.heappop(self._expiry)
            known = self._entries.get((build_id, address))
            if known is None or known.get(name) != expiry:
                continue  # refreshed by a later answer, or already gone
            del known[name]
            removed += 1
            if not known:
                del self._entries[(build_id, address)]
        return removed

    def forget_build(self, build_id: str) -> None:
        """Drop a finished build's knowledge (the heap entries lapse on their own)."""
        for key in [k for k in self._entries if k[0] == build_id]:
            del self._entries[key]

    def __len__(self) -> int:
        return sum(len(v) for v in self._entries.values())
