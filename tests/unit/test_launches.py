"""The tie of a new container cgroup to the build that asked an engine (launches.py)."""

from __future__ import annotations

import pytest

from egress_monitor.launches import GRACE_NS, MAX_OPEN_NS, Request, expired, tie, window_end

S = 1_000_000_000


def req(build: str, at: float, ended: float | None = None, pid: int = 10) -> Request:
    return Request(build, pid, "build-script", "evil", "docker", int(at * S),
                   None if ended is None else int(ended * S))


@pytest.mark.parametrize(("requests", "appeared", "outcome", "build"), [
    ([], 5, "none", None),
    ([req("a", 1)], 2, "tied", "a"),  # conversation open
    ([req("a", 1)], 0.5, "none", None),  # appeared before anyone asked
    ([req("a", 1, ended=2)], 2 + GRACE_NS / S - 0.1, "tied", "a"),  # within the grace
    ([req("a", 1, ended=2)], 2 + GRACE_NS / S + 0.1, "none", None),  # after it
    ([req("a", 1)], 1 + (MAX_OPEN_NS + GRACE_NS) / S + 1, "none", None),  # long-lived asker
    ([req("a", 1), req("a", 3, pid=11)], 4, "tied", "a"),  # two requests, one build
    ([req("a", 1), req("b", 2)], 3, "ambiguous", None),
    ([req("a", 1, ended=1.5), req("b", 10)], 11, "tied", "b"),  # a's window is over
    ([req("a", 2, ended=1)], 2.5, "tied", "a"),  # an exit stamp before the request
])
def test_tie(requests: list[Request], appeared: float, outcome: str,
             build: str | None) -> None:
    got = tie(requests, int(appeared * S))
    assert got.outcome == outcome
    assert (got.request.build_id if got.request else None) == build
    if outcome == "ambiguous":
        assert got.candidates == ("a", "b")


def test_the_latest_request_of_the_build_is_the_one_named() -> None:
    got = tie([req("a", 1, pid=1), req("a", 3, pid=2)], 4 * S)
    assert got.request is not None and got.request.pid == 2


def test_expired_after_the_window() -> None:
    r = req("a", 1, ended=2)
    assert not expired(r, window_end(r))
    assert expired(r, window_end(r) + 1)
