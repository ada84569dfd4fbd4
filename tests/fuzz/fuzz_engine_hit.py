"""Unix-connect hits read from the kernel's ``engine_hits`` map: key then value, any bytes."""

from egress_monitor.bpf.engines import HIT_KEY, parse_hit

ALLOWED: tuple[type[BaseException], ...] = ()
MAX_LEN = 512


def target(data: bytes) -> None:
    parse_hit(data[:HIT_KEY.size], data[HIT_KEY.size:])
