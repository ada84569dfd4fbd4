"""Which loopback sockets a flow may reach, from /proc/net tables as the kernel writes them."""

from __future__ import annotations

from egress_monitor.loopback import NetEntry, parse_line, parse_table, reached

TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 101 1 0
   1: 0200007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 102 1 0
   2: 0100007F:C967 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 103 1 0
   3: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 104 1 0
   4: 0100007F:1F91 0100007F:1F90 02 00000000:00000000 00:00000000 00000000     0        0 105 1 0
"""
_TAIL = " 0A 00000000:00000000 00:00000000 00000000     0        0 {} 1 0"
TCP6 = "\n".join(f"   {i}: {local} {'0' * 32}:0000" + _TAIL.format(inode) for i, (local, inode) in
                 enumerate([("0" * 32 + ":0050", 201),
                            ("0" * 24 + "01000000:1F92", 202),
                            ("0000000000000000FFFF00000100007F:1F93", 203)]))
ENTRIES = parse_table(TCP) + parse_table(TCP6)


def test_addresses_ports_states_and_inodes_are_read() -> None:
    assert ENTRIES[0] == NetEntry("127.0.0.1", 8080, 0x0A, 101)
    assert [e.addr for e in ENTRIES[-3:]] == ["::", "::1", "127.0.0.1"]  # mapped -> v4
    assert parse_line("garbage") is None and parse_line("  0: zz:1 0 0A 0 0 0 0 0 x") is None


def test_the_exact_listener_wins_and_clients_never_count() -> None:
    # 127.0.0.1:8080 has its own listener; the one at 127.0.0.2:8080 is another address, and
    # a client socket bound to 127.0.0.1:8081 connecting to 8080 is not listening.
    assert reached(ENTRIES, "tcp", "127.0.0.1", 8080) == {101}
    assert reached(ENTRIES, "tcp", "127.0.0.1", 8081) == set()
    assert reached(ENTRIES, "tcp", "127.0.0.1", 22) == {104}  # wildcard 0.0.0.0
    assert reached(ENTRIES, "tcp", "127.0.0.1", 80) == {201}  # dual-stack ::
    assert reached(ENTRIES, "tcp", "::1", 8082) == {202}
    assert reached(ENTRIES, "tcp", "::1", 22) == set()  # 0.0.0.0 takes no IPv6
    assert reached(ENTRIES, "tcp", "127.0.0.1", 8083) == {203}
    assert reached(ENTRIES, "udp", "127.0.0.1", 8080) == set()  # states are per protocol
