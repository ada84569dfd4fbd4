"""Build cgroup names (a build can create cgroups) and mountinfo text."""

from egress_monitor.enforce.cgroups import (
    build_queue_of,
    find_cgroup2_mount,
    parse_build_cgroup,
)

ALLOWED: tuple[type[BaseException], ...] = ()
DICTIONARY = (b"egress-build-q", b"-", b"/", b"\xc2\xb2", "\u0663".encode(), b"9" * 4400,
              b" - cgroup2 ", b"\n")


def target(data: bytes) -> None:
    text = data.decode("utf-8", "surrogateescape")
    parse_build_cgroup(text)
    build_queue_of(text)
    find_cgroup2_mount(text)
