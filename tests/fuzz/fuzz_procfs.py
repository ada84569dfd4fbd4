"""/proc text a build can shape: stat (its comm), cgroup (its cgroup names), /proc/net
tables, fd links."""

from egress_monitor.sources.procfs import (
    parse_cgroup2,
    parse_net_table,
    parse_ppid,
    parse_socket_link,
)

ALLOWED: tuple[type[BaseException], ...] = ()
DICTIONARY = (b")", b" ", b"\n", b"0::/", b"1:name=systemd:/", b"socket:[", b"]",
              b" 00000000:0035 ", b"\xff", b"\xc2\xb2")


def target(data: bytes) -> None:
    parse_ppid(data)
    parse_cgroup2(data)
    parse_net_table(data)
    parse_net_table(data, 53)
    parse_socket_link(data.decode("utf-8", "surrogateescape"))
