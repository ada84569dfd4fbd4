"""The kernel side of container-engine laundering: cgroup hooks on Unix socket connects.

A build that asks a container engine (Docker, Podman, containerd, BuildKit) to run something
has code outside the build act for it. The request travels over a Unix socket, so
``em_unix_connect`` (cgroup ``connect_unix``: stream and datagram ``connect()``) and
``em_unix_send`` (cgroup ``sendmsg_unix``: a datagram sent to an address), attached at the
cgroup2 root like the other cgroup programs, see every member's Unix socket address:

- the path the member gave (``sun_path``, up to ``uaddrlen``; empty for abstract and
  unnamed addresses) is looked up in ``engine_paths``, which userspace fills with each
  engine socket's configured path and its resolved path. A match while ``engine_conf[0]``
  has :data:`CONF_REFUSE` returns 0: ``connect()``/``sendmsg()`` fail with EPERM before the
  kernel looks the path up, so the engine receives nothing;
- every member's Unix connect, matched or not, is written to ``engine_hits`` keyed by
  ``(tgid, path)``, so userspace can resolve the paths the kernel could not match (a
  symlink, a bind mount, ``/proc/PID/root/...``, a relative path) to the engine socket's
  file identity afterwards (an alert and kill-build then, not a refusal).

Why by path and not by the listener's identity (an LSM hook on ``unix_stream_connect`` sees
the listener): the CI machine's kernel (6.18, BPF LSM in its LSM list) refuses every
BTF-attached program (LSM, fentry: ``EPERM`` at load, even for a two-instruction program),
while cgroup programs load. The path is what the
kernel was given *before* it resolved it; the identity check is userspace's.

Maps (created by ``owner.py``):

- ``engine_paths``: hash, char[108] path (NUL-padded) -> u32 engine index;
- ``engine_conf``: array, one u32: bit 0 :data:`CONF_REFUSE`;
- ``engine_hits``: LRU hash, :data:`HIT_KEY` (u32 tgid, char[108] path) -> :data:`HIT`;
  userspace reads and deletes them each tick; kept after the process exits.

Non-members cost one hash lookup and are always allowed. :func:`parse_hit` is pure and
total (fuzzed).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from egress_monitor.bpf.asm import (
    ADD,
    AND,
    GET_CURRENT_PID_TGID,
    JEQ,
    JSGT,
    JSLT,
    KTIME_GET_NS,
    MAP_LOOKUP_ELEM,
    MAP_UPDATE_ELEM,
    MOV,
    OR,
    PROBE_READ_KERNEL_STR,
    R0,
    R1,
    R2,
    R3,
    R4,
    R6,
    R7,
    R8,
    R9,
    R10,
    RSH,
    SUB,
    Asm,
)
from egress_monitor.bpf.btf import Btf
from egress_monitor.bpf.programs import STAT_ENGINE_REFUSED, STAT_ENGINE_SEEN, _count

PATH_MAX = 108  # sizeof(sockaddr_un.sun_path)
ENGINES_MAX, HITS_MAX = 256, 4096
CONF_REFUSE = 1
NO_ENGINE = 0xFFFFFFFF  # a hit whose path matched no engine path
HIT_REFUSED, HIT_DATAGRAM = 1, 2  # a hit's flags
HIT_KEY = struct.Struct(f"=I{PATH_MAX}s")
# ktime_ns (CLOCK_MONOTONIC), members value of the tgid, engine index, flags.
HIT = struct.Struct("=QQII")
ATTACH_UNIX_CONNECT, ATTACH_UNIX_SENDMSG = 49, 50  # enum bpf_attach_type (6.7+)
HOOKS = (("em_unix_connect", ATTACH_UNIX_CONNECT, False),
         ("em_unix_send", ATTACH_UNIX_SENDMSG, True))
_SUN_PATH = 2  # offsetof(struct sockaddr_un, sun_path)
# Stack: tgid (fp-4); the hit key: tgid (fp-120), path (fp-116 .. fp-8); the member value
# (fp-160); the hit (fp-184 .. fp-160). _count uses fp-128.
_KEY, _PATH, _MEMBER, _HIT = -120, -116, -160, -184


@dataclass(frozen=True)
class KernCtx:
    """What the programs need from this kernel's BTF."""

    cast_kfunc: int  # BTF id of bpf_cast_to_kern_ctx
    uaddr: int  # offsetof(struct bpf_sock_addr_kern, uaddr)
    uaddrlen: int

    @classmethod
    def from_btf(cls, btf: Btf) -> KernCtx:
        """Raises :class:`~egress_monitor.bpf.btf.BtfError` naming what this kernel lacks
        (older than 6.7: no ``uaddrlen``, no Unix socket hooks)."""
        return cls(btf.func_id("bpf_cast_to_kern_ctx"),
                   btf.member_offset("bpf_sock_addr_kern", "uaddr"),
                   btf.member_offset("bpf_sock_addr_kern", "uaddrlen"))


@dataclass(frozen=True)
class EngineFds:
    members: int
    stats: int
    paths: int
    conf: int
    hits: int


@dataclass(frozen=True)
class Hit:
    """One member's Unix socket connect (or addressed datagram), as the kernel saw it."""

    tgid: int
    path: str  # as given (relative stays relative), decoded with surrogateescape
    ktime_ns: int
    member: int  # the ``members`` value: build (or pending root) and role
    engine: int | None  # index of the engine path it matched; None: no match in the kernel
    refused: bool
    datagram: bool


def path_key(path: str) -> bytes:
    """The ``engine_paths`` key for a path (NUL-padded; over-long paths never match)."""
    raw = path.encode("utf-8", "surrogateescape")
    return raw.ljust(PATH_MAX, b"\0") if len(raw) < PATH_MAX else b""


def parse_hit(key: bytes, value: bytes) -> Hit | None:
    """A hit from an ``engine_hits`` key and value; None for anything that is not one."""
    if len(key) != HIT_KEY.size or len(value) != HIT.size:
        return None
    tgid, raw = HIT_KEY.unpack(key)
    ktime, member, engine, flags = HIT.unpack(value)
    path = raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    return Hit(tgid, path, ktime, member, None if engine == NO_ENGINE else engine,
               bool(flags & HIT_REFUSED), bool(flags & HIT_DATAGRAM))


def unix_program(fds: EngineFds, ctx: KernCtx, datagram: bool) -> bytes:
    """cgroup ``connect_unix`` (``datagram`` False) or ``sendmsg_unix`` (True): a member's
    address is recorded in ``engine_hits`` and, when it is an engine path and
    ``engine_conf`` says refuse, refused (returns 0: EPERM). Non-members, and anything that
    cannot be read, are allowed: the hook only adds a refusal for members."""
    a = Asm().mov(R6, R1)
    a.call(GET_CURRENT_PID_TGID).alu_imm(RSH, R0, 32).stx(4, R10, -4, R0)
    a.ld_map_fd(R1, fds.members).mov(R2, R10).alu_imm(ADD, R2, -4).call(MAP_LOOKUP_ELEM)
    a.jmp_imm(JEQ, R0, 0, "allow").ldx(8, R1, R0, 0).stx(8, R10, _MEMBER, R1)
    for slot in range(_KEY, -4, 4):
        a.st_imm(4, R10, slot, 0)
    a.ldx(4, R1, R10, -4).stx(4, R10, _KEY, R1)
    # The path: at most uaddrlen - 2 bytes (the rest of the kernel's copy is not the
    # caller's), so probe_read_kernel_str reads uaddrlen - 1 with its NUL, capped at 108.
    a.mov(R1, R6).call_kfunc(ctx.cast_kfunc).jmp_imm(JEQ, R0, 0, "allow").mov(R7, R0)
    a.ldx(4, R2, R7, ctx.uaddrlen).alu_imm(SUB, R2, 1)
    a.jmp_imm(JSLT, R2, 2, "allow").jmp_imm(JSGT, R2, PATH_MAX, "cap").ja("read")
    a.label("cap").mov_imm(R2, PATH_MAX)
    a.label("read").ldx(8, R3, R7, ctx.uaddr).jmp_imm(JEQ, R3, 0, "allow")
    a.alu_imm(ADD, R3, _SUN_PATH).mov(R1, R10).alu_imm(ADD, R1, _PATH)
    a.call(PROBE_READ_KERNEL_STR)
    a.alu_imm(MOV, R8, -1, wide=False).mov_imm(R9, 0)  # NO_ENGINE
    a.ld_map_fd(R1, fds.paths).mov(R2, R10).alu_imm(ADD, R2, _PATH).call(MAP_LOOKUP_ELEM)
    a.jmp_imm(JEQ, R0, 0, "record").ldx(4, R8, R0, 0)
    a.st_imm(4, R10, -8, 0)  # the conf key (fp-8 is past the path)
    a.ld_map_fd(R1, fds.conf).mov(R2, R10).alu_imm(ADD, R2, -8).call(MAP_LOOKUP_ELEM)
    a.jmp_imm(JEQ, R0, 0, "record").ldx(4, R9, R0, 0).alu_imm(AND, R9, CONF_REFUSE)
    a.label("record").call(KTIME_GET_NS).stx(8, R10, _HIT, R0)
    a.ldx(8, R1, R10, _MEMBER).stx(8, R10, _HIT + 8, R1).stx(4, R10, _HIT + 16, R8)
    a.mov(R1, R9)
    if datagram:
        a.alu_imm(OR, R1, HIT_DATAGRAM)
    a.stx(4, R10, _HIT + 20, R1)
    a.ld_map_fd(R1, fds.hits).mov(R2, R10).alu_imm(ADD, R2, _KEY).mov(R3, R10)
    a.alu_imm(ADD, R3, _HIT).mov_imm(R4, 0).call(MAP_UPDATE_ELEM)
    a.jmp_imm(JEQ, R8, NO_ENGINE, "allow", wide=False)
    _count(a, fds.stats, STAT_ENGINE_SEEN)
    a.jmp_imm(JEQ, R9, 0, "allow")
    _count(a, fds.stats, STAT_ENGINE_REFUSED)
    a.mov_imm(R0, 0).exit()
    a.label("allow").mov_imm(R0, 1).exit()
    return a.assemble()

