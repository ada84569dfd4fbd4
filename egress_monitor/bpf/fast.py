"""The SYN ahead: a member's repeat TCP connection leaves without waiting for the queue.

A new TCP connection of a build waits in NFQUEUE while the daemon judges its SYN: the trip
through the queue and the daemon's Python cost about half a millisecond a connection. Most
of a build's connections repeat one the daemon has already allowed: the same process to the
same address and port (cargo fetching crate after crate, a test suite calling its server).
For those, the kernel lets the SYN out at once and the daemon judges the connection, in
full, at its next packet (the handshake's ACK, queued by the first-data chain as for every
build flow). Nothing of the connection but the SYN leaves before that judgment, and a SYN
goes only where the daemon allowed that same process before.

- ``fast``: LRU hash, :func:`fast_key` (creator tgid, family, port, address) -> u64 (unused,
  0). Only the daemon writes it, after allowing a connection by policy
  (:meth:`BpfOwner.allow_fast`), and removes a process's keys when it exits, a build's when
  it ends, all of them when the policy changes.
- ``lease``: array of one u64, the ``CLOCK_MONOTONIC`` time (ns) until which SYNs may go
  ahead at all. The daemon renews it every second (:meth:`BpfOwner.renew_ahead`, a few
  seconds ahead) and sets it to 0 when it stops. A daemon killed outright renews nothing, so
  within :data:`LEASE_S` every SYN is queued again, where nobody reads it (fail closed),
  instead of going out ahead to destinations it allowed before.
- ``em_connect4`` / ``em_connect6`` (cgroup ``connect`` hooks at the cgroup2 root) run in
  every ``connect()`` (and ``sendto(MSG_FASTOPEN)``) of a TCP socket a member created: when
  the lease holds and ``fast`` holds (creator, destination), the socket's mark becomes
  ``stamp | layout.fast``
  and its storage (``sockets``, :data:`SOCKET_VALUE`) records the destination; otherwise a
  mark and record left by an earlier connect on the socket are cleared. They never refuse a
  connect.
- nat's first rule for ``stamp | fast`` (``enforce/rules.py``) sets the flow's connmark so
  its first data is queued, and returns without queueing the SYN.
- The backstop (``programs.backstop_program``) passes a member's packet without a verdict
  only when its mark has the fast bit, its socket's record says fast, the packet goes to the
  recorded address and port, and it is a bare SYN (no ACK, no data: TCP Fast Open data is
  never sent ahead). Every later packet of the flow needs the verdict the daemon writes when
  it judges the ACK. A mark with the fast bit that our hook did not set (``SO_MARK`` by a
  root member, a non-member's socket) finds no record, or no verdict, and is dropped.
"""

from __future__ import annotations

import struct

from egress_monitor.bpf.asm import (
    ADD,
    AND,
    JEQ,
    JGT,
    JNE,
    KTIME_GET_NS,
    LSH,
    MAP_LOOKUP_ELEM,
    OR,
    R0,
    R1,
    R2,
    R3,
    R4,
    R5,
    R6,
    R7,
    R8,
    R10,
    SK_STORAGE_GET,
    Asm,
)
from egress_monitor.bpf.marks import MarkLayout

FAST_KEY, FAST_MAX = 24, 16384
LEASE_S = 3.0  # how long a renewal of the lease holds (the daemon renews every second)
# A member socket's storage (``sockets``): u64 SOCKET_MEMBER | creator tgid, then the record
# of a connect sent ahead: u32 flag, u8 family, u8 pad, u16 port (network order), 16 bytes
# address (IPv4 in the first 4). Bytes 12-31 are bytes 4-23 of the connect's ``fast`` key.
SOCKET_VALUE = 32
ST_FAST, ST_FAMILY, ST_PORT, ST_ADDR = 8, 12, 14, 16
SETSOCKOPT = 49  # bpf_setsockopt (enum bpf_func_id)
SOL_SOCKET, SO_MARK, SOCK_STREAM = 1, 36, 1
# struct bpf_sock_addr (UAPI, stable): user_ip4, user_ip6[4], user_port, type, sk
_SA_IP4, _SA_IP6, _SA_PORT, _SA_TYPE, _SA_SK = 4, 8, 24, 32, 64
_KEY = -24  # the fast key on the stack: fp-24 .. fp-1
_MARK = -32
_LEASE_KEY = -40


def fast_key(tgid: int, family: int, dst: bytes, dport: int) -> bytes:
    """The ``fast`` key the connect hooks build: creator tgid (native order), family (4 or
    6), port (network order), address (packed; IPv4 padded to 16 bytes)."""
    return struct.pack("=IBx", tgid, family) + struct.pack("!H", dport) + dst.ljust(16, b"\0")


def _set_mark(a: Asm, layout: MarkLayout, fast: bool) -> None:
    """setsockopt(SOL_SOCKET, SO_MARK) to the creator's stamp (the tgid in the storage at r7),
    with the fast bit when ``fast``; r0 = its result."""
    a.ldx(8, R2, R7, 0).alu_imm(LSH, R2, layout.tgid_shift, wide=False)
    a.alu_imm(AND, R2, layout.tgid_mask, wide=False)
    a.alu_imm(OR, R2, layout.tag | (layout.fast if fast else 0), wide=False)
    a.stx(4, R10, _MARK, R2)
    a.mov(R1, R6).mov_imm(R2, SOL_SOCKET).mov_imm(R3, SO_MARK).mov(R4, R10)
    a.alu_imm(ADD, R4, _MARK).mov_imm(R5, 4).call(SETSOCKOPT)


def connect_program(fast_fd: int, sockets_fd: int, lease_fd: int, layout: MarkLayout,
                    family: int) -> bytes:
    """cgroup ``connect4`` (``family`` 4) or ``connect6``: send the SYN of a member's TCP
    connect ahead when the lease holds and ``fast`` holds its (creator, destination); see
    the module's text.
    Always returns 1 (the connect proceeds): this program only ever relaxes the queue for
    destinations the daemon allowed, and the backstop holds the rest."""
    if not layout.fast:
        raise ValueError("the mark layout has no fast bit")
    a = Asm().mov(R6, R1)
    a.ldx(4, R2, R6, _SA_TYPE).jmp_imm(JNE, R2, SOCK_STREAM, "out", wide=False)
    a.ld_map_fd(R1, sockets_fd).ldx(8, R2, R6, _SA_SK).mov_imm(R3, 0).mov_imm(R4, 0)
    a.call(SK_STORAGE_GET).jmp_imm(JEQ, R0, 0, "out").mov(R7, R0)
    # The daemon's lease: lapsed (a daemon killed outright), nothing goes ahead.
    a.st_imm(4, R10, _LEASE_KEY, 0).ld_map_fd(R1, lease_fd).mov(R2, R10)
    a.alu_imm(ADD, R2, _LEASE_KEY).call(MAP_LOOKUP_ELEM).jmp_imm(JEQ, R0, 0, "slow")
    a.ldx(8, R8, R0, 0).call(KTIME_GET_NS).jmp_reg(JGT, R0, R8, "slow")
    for slot in (-24, -16, -8):
        a.st_imm(8, R10, slot, 0)
    a.ldx(8, R2, R7, 0).stx(4, R10, _KEY, R2)  # the creator: low 32 bits of the u64
    a.st_imm(1, R10, _KEY + 4, family)
    a.ldx(4, R2, R6, _SA_PORT).stx(2, R10, _KEY + 6, R2)  # network order in memory
    if family == 4:
        a.ldx(4, R2, R6, _SA_IP4).stx(4, R10, _KEY + 8, R2)
    else:
        for i in range(4):
            a.ldx(4, R2, R6, _SA_IP6 + 4 * i).stx(4, R10, _KEY + 8 + 4 * i, R2)
    a.ld_map_fd(R1, fast_fd).mov(R2, R10).alu_imm(ADD, R2, _KEY).call(MAP_LOOKUP_ELEM)
    a.jmp_imm(JEQ, R0, 0, "slow")
    _set_mark(a, layout, fast=True)
    a.jmp_imm(JNE, R0, 0, "out")  # the mark could not be set: the SYN is queued as usual
    for off in range(4, FAST_KEY, 4):
        a.ldx(4, R2, R10, _KEY + off).stx(4, R7, ST_FAST + off, R2)
    a.st_imm(4, R7, ST_FAST, 1).ja("out")
    # Not allowed ahead: undo what an earlier connect on this socket set.
    a.label("slow").ldx(4, R2, R7, ST_FAST).jmp_imm(JEQ, R2, 0, "out", wide=False)
    a.st_imm(4, R7, ST_FAST, 0)
    _set_mark(a, layout, fast=False)
    a.label("out").mov_imm(R0, 1).exit()
    return a.assemble()
