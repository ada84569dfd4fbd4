"""inotify reads (``sources/cgroup_watch.parse_events``): any bytes."""

from egress_monitor.sources.cgroup_watch import parse_events

ALLOWED: tuple[type[BaseException], ...] = ()
MAX_LEN = 4096


def target(data: bytes) -> None:
    parse_events(data)
