"""Containers an engine starts for a build: which build a new container cgroup belongs to.

A build member that talks to a container engine (its socket: ``bpf/engines.py``; its CLI:
``engines.py``) asks code outside the build to run something. The engine's container then
appears as a new cgroup (``docker-<id>.scope`` ...). The daemon cannot see inside the
engine which request made which container, so the tie is by time: a container whose cgroup
appears while exactly one build has an engine conversation open (or ended less than
``grace_ns`` ago) is that build's. Two builds in the window: tied to none (ambiguous, said
in an alert); no build: not ours.

A conversation is open from the member's connect (or CLI exec) until the requesting
process exits, at most ``max_open_ns`` (a long-lived process that once talked to the
engine, cargo itself, must not claim every later container). Requests of non-members are
invisible here: a container someone else starts while a build is talking is tied to that
build (its traffic is judged under the build's policy: stricter, never looser).

Pure: :func:`tie` is a function of the requests and the moment the cgroup appeared
(CLOCK_MONOTONIC ns, the clock of the kernel's hits and the proc connector's stamps).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

GRACE_NS = 3_000_000_000  # after the requester's exit: an engine answers within seconds
MAX_OPEN_NS = 60_000_000_000


@dataclass(frozen=True, slots=True)
class Request:
    """One member's engine conversation: connect (or CLI exec) at ``at_ns``; the requester
    exited at ``ended_ns`` (None: still running)."""

    build_id: str
    pid: int
    role: str  # the requester's role (events, policy)
    crate: str | None  # the requester's crate name
    engine: str  # docker, podman, ... (engines.engine_label, or the CLI's name)
    at_ns: int
    ended_ns: int | None = None
    crate_version: str | None = None


@dataclass(frozen=True, slots=True)
class Tie:
    """The answer for one container: ``outcome`` tied (``request`` is the build's latest
    open request), ambiguous (``candidates`` are the builds), or none."""

    outcome: Literal["tied", "ambiguous", "none"]
    request: Request | None = None
    candidates: tuple[str, ...] = ()


def window_end(req: Request, *, grace_ns: int = GRACE_NS,
               max_open_ns: int = MAX_OPEN_NS) -> int:
    """The last moment a container may appear and still be this request's."""
    closed = req.at_ns + max_open_ns
    if req.ended_ns is not None:
        closed = min(closed, max(req.ended_ns, req.at_ns))
    return closed + grace_ns


def in_window(req: Request, t_ns: int, *, grace_ns: int = GRACE_NS,
              max_open_ns: int = MAX_OPEN_NS) -> bool:
    return req.at_ns <= t_ns <= window_end(req, grace_ns=grace_ns, max_open_ns=max_open_ns)


def tie(requests: Iterable[Request], appeared_ns: int, *, grace_ns: int = GRACE_NS,
        max_open_ns: int = MAX_OPEN_NS) -> Tie:
    """Which build a container whose cgroup appeared at ``appeared_ns`` belongs to."""
    latest: dict[str, Request] = {}
    for req in requests:
        if in_window(req, appeared_ns, grace_ns=grace_ns, max_open_ns=max_open_ns):
            held = latest.get(req.build_id)
            if held is None or req.at_ns >= held.at_ns:
                latest[req.build_id] = req
    if not latest:
        return Tie("none")
    if len(latest) > 1:
        return Tie("ambiguous", candidates=tuple(sorted(latest)))
    only = next(iter(latest.values()))
    return Tie("tied", only, (only.build_id,))


def expired(req: Request, now_ns: int, *, grace_ns: int = GRACE_NS,
            max_open_ns: int = MAX_OPEN_NS) -> bool:
    """Whether no container appearing from now on can be this request's."""
    return now_ns > window_end(req, grace_ns=grace_ns, max_open_ns=max_open_ns)
