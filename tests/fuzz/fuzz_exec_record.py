"""Exec records read from the kernel's ``execs`` map (bytes of any length)."""

from egress_monitor.bpf.execs import parse_exec_record

ALLOWED: tuple[type[BaseException], ...] = ()
MAX_LEN = 1024


def target(data: bytes) -> None:
    parse_exec_record(1, data)
