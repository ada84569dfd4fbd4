"""The six BPF programs, assembled for the running kernel, and the formats of their maps.

Maps (created by ``owner.py``, shared by the programs and userspace):

- ``members``: hash, u32 tgid -> u64 value (:func:`member_value`): bit 63 (:data:`PENDING`)
  means "a new build started here, userspace has not named it yet" and the low 32 bits then
  hold the tgid that exec'd cargo, otherwise the build id userspace wrote (adoption,
  ``egress-monitor exec``); bits 32-39 hold the role by provenance (``ROLE_*``). The kernel
  writes it on exec and fork, deletes it on exit.
- ``toolchain``: hash, (u32 kernel dev_t, u32 0, u64 inode) -> u32 kind (``FILE_*``): the
  toolchain's files, by file identity (never by name), filled by userspace.
- ``verdicts``: LRU hash, :func:`flow_key` -> u64: flows the daemon judged and let through.
- ``sockets``: socket storage, u64 per socket: ``1 << 32 | creator tgid`` for every socket a
  member created (written by ``sock_create``, read by the backstop; freed with the socket).
  Unlike the mark, no setsockopt can change or clear it.
- ``execs``: LRU hash, u32 tgid -> exec record (:data:`EXEC_RECORD`, decoded by
  ``execs.parse_exec_record``): what ``em_exec`` decided at a member's latest exec, kept after
  the process exits (only the LRU or userspace's ``forget_exec`` removes it), so userspace can
  read the decision for a process that is already gone when its proc connector event arrives.
  An exec whose role before was ``ROLE_CARGO`` (cargo ran this: crate code, the compiler) or
  that started a build is also written under ``tgid | EXEC_TRANSITION``, which only a later
  such exec overwrites: a build script that execs something at once keeps its record there.
- ``exec_scratch``: per-CPU array, one record: where ``em_exec`` builds a record (the BPF stack
  is 512 bytes). Safe to share: tracepoint callbacks run with preemption disabled and the
  kernel never runs a program nested in itself on one CPU.
- ``stats``: array of u64 counters, indexed by the ``STAT_*`` constants.
- ``netns``: LRU hash, u64 network-namespace cookie -> u32 tgid: each namespace a member made
  a socket in, with the first member seen doing so (written by ``sock_create``, never
  overwritten; userspace reads it to gate namespaces, :meth:`BpfOwner.netns_seen`). A
  namespace's cookie is what ``getsockopt(SO_NETNS_COOKIE)`` gives on a socket made in it;
  cookies are never reused, and the LRU drops the oldest when full, never a new one.

Every program only *adds* restrictions for members: a non-member's fork, exec, exit, socket
and packet leave every map and mark untouched.
"""

from __future__ import annotations

import itertools
import os
import struct
from dataclasses import dataclass

from egress_monitor.bpf import fast
from egress_monitor.bpf.asm import (
    ADD,
    AND,
    GET_CURRENT_CGROUP_ID,
    GET_CURRENT_PID_TGID,
    JEQ,
    JNE,
    JSGT,
    KTIME_GET_NS,
    LSH,
    MAP_DELETE_ELEM,
    MAP_LOOKUP_ELEM,
    MAP_UPDATE_ELEM,
    MOV,
    OR,
    PROBE_READ_KERNEL,
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
    SK_FULLSOCK,
    SK_STORAGE_GET,
    SKB_LOAD_BYTES,
    SUB,
    Asm,
)
from egress_monitor.bpf.btf import Btf, BtfError
from egress_monitor.bpf.marks import MarkLayout

PENDING = 1 << 63
MEMBERS_MAX, TOOLCHAIN_MAX, VERDICTS_MAX = 65536, 1024, 65536
NETNS_MAX = 4096
CGROUPS_MAX = 1024
ROLE_SHIFT = 32
ROLE_NONE, ROLE_CARGO, ROLE_RUSTC, ROLE_CRATE = 0, 1, 2, 3
FILE_CARGO, FILE_RUSTC, FILE_TOOL = 1, 2, 3
# A configured build-script runner (Bazel's, Buck2's): userspace's kind only; the kernel is
# given FILE_CARGO for it (BpfOwner.add_toolchain_file), so it starts a build like cargo.
FILE_RUNNER = 4
MEMBER_KEY, MEMBER_VALUE, FILE_KEY, FLOW_KEY = 4, 8, 16, 40

STAT_FORK_FOLLOWED, STAT_FORK_LOST, STAT_EXEC_STARTED, STAT_EXEC_LOST = 0, 1, 2, 3
STAT_READ_FAILED, STAT_STAMPED, STAT_BACKSTOP_DROPPED, STAT_EXIT_REMOVED = 4, 5, 6, 7
STAT_SOCKET_REFUSED, STAT_ROLE_CHANGED, STAT_EXEC_RECORDED, STAT_EXEC_UNRECORDED = 8, 9, 10, 11
STAT_ENGINE_SEEN, STAT_ENGINE_REFUSED = 12, 13  # bpf/engines.py's programs
STAT_MARK_FORGED, STAT_MARK_REFUSED, STAT_FLOW_REUSED, STAT_CGROUP_JOINED = 14, 15, 16, 17
STATS = ("fork_followed", "fork_lost", "exec_started", "exec_lost", "read_failed", "stamped",
         "backstop_dropped", "exit_removed", "socket_refused", "role_changed", "exec_recorded",
         "exec_unrecorded", "engine_seen", "engine_refused", "mark_forged", "mark_refused",
         "flow_reused", "cgroup_joined")
SOCKET_MEMBER = 1 << 32  # in a ``sockets`` value, above the creator tgid
# In a ``verdicts`` value: the low 32 bits are the creator the daemon judged the flow for, and
# only a socket that creator made may use the verdict (:func:`verdict_value`).
VERDICT_CREATOR = 1 << 32

# An ``execs`` record: u64 ktime_ns, u64 member value after the exec, u8 role before, u8 flags,
# u16 pad, u32 kernel dev_t and u64 inode of bprm->file, char filename[256] (bprm->filename,
# NUL-terminated, truncated to 255 bytes). Native byte order.
EXEC_RECORD = struct.Struct("=QQBBxxIQ256s")
EXECS_MAX = 16384
EXEC_STARTED = 1  # flags bit 0: this exec started a build
# ``execs`` key bit of a transition record (tgids are below 2**22, PID_MAX_LIMIT): the exec
# cargo handed the process over in, kept while the process execs further.
EXEC_TRANSITION = 1 << 31
_REC_KTIME, _REC_VALUE, _REC_ROLE, _REC_FLAGS, _REC_DEV, _REC_INODE, _REC_NAME = (
    0, 8, 16, 17, 20, 24, 32)
FILENAME_MAX = EXEC_RECORD.size - _REC_NAME

_SOCK_MARK = 16  # offsetof(struct bpf_sock, mark)
_SKB_MARK, _SKB_IFINDEX, _SKB_SK = 8, 40, 168  # offsetof(struct __sk_buff, mark/ifindex/sk)
_SK_STORAGE_F_CREATE = 1
# offsetof(struct bpf_sockopt, sk / level / optname / optlen)
_SOCKOPT_SK, _SOCKOPT_LEVEL, _SOCKOPT_OPTNAME, _SOCKOPT_OPTLEN = 0, 24, 28, 32
SOL_SOCKET, SO_MARK = 1, 36  # asm-generic values (x86_64, aarch64)
_GET_NETNS_COOKIE = 122  # bpf_get_netns_cookie (linux/bpf.h)
_UPDATE_NOEXIST = 1
LOOPBACK_IFINDEX = 1  # the kernel gives every namespace's lo ifindex 1
_STAT_SLOT = -128
_labels = itertools.count()


@dataclass(frozen=True)
class Offsets:
    """Byte offsets into kernel structs, from the running kernel's BTF."""

    task_tgid: int
    binprm_file: int
    file_inode: int
    inode_ino: int
    inode_sb: int
    sb_dev: int
    exit_has_group_dead: bool
    task_signal: int
    signal_live: int
    binprm_filename: int

    @classmethod
    def from_btf(cls, btf: Btf) -> Offsets:
        """Raises :class:`BtfError` naming the first struct member this kernel lacks."""
        for tp, least in (("sched_process_fork", 2), ("sched_process_exec", 3),
                          ("sched_process_exit", 1)):
            if btf.tracepoint_args(tp) < least:
                raise BtfError(f"tracepoint {tp} has fewer than {least} arguments")
        return cls(btf.member_offset("task_struct", "tgid"),
                   btf.member_offset("linux_binprm", "file"),
                   btf.member_offset("file", "f_inode"), btf.member_offset("inode", "i_ino"),
                   btf.member_offset("inode", "i_sb"), btf.member_offset("super_block", "s_dev"),
                   btf.tracepoint_args("sched_process_exit") >= 2,
                   btf.member_offset("task_struct", "signal"),
                   btf.member_offset("signal_struct", "live"),
                   btf.member_offset("linux_binprm", "filename"))


@dataclass(frozen=True)
class MapFds:
    members: int
    toolchain: int
    verdicts: int
    stats: int
    sockets: int
    execs: int
    exec_scratch: int
    netns: int
    fast: int = -1  # bpf/fast.py
    cgroups: int = -1  # cgroup id -> member value: containers tied to a build (launches.py)
    lease: int = -1  # [0] -> u64 monotonic ns until which SYNs may go ahead (bpf/fast.py)


def _count(a: Asm, stats_fd: int, index: int) -> None:
    """stats[index] += 1 (atomically; clobbers r0-r5)."""
    skip = f"c{next(_labels)}"
    a.st_imm(4, R10, _STAT_SLOT, index).ld_map_fd(R1, stats_fd)
    a.mov(R2, R10).alu_imm(ADD, R2, _STAT_SLOT).call(MAP_LOOKUP_ELEM)
    a.jmp_imm(JEQ, R0, 0, skip).mov_imm(R1, 1).atomic_add64(R0, 0, R1).label(skip)


def _current_tgid_at(a: Asm, slot: int) -> None:
    """*(u32 *)(fp + slot) = current tgid, also left in r0."""
    a.call(GET_CURRENT_PID_TGID).alu_imm(RSH, R0, 32).stx(4, R10, slot, R0)


def _lookup(a: Asm, fd: int, slot: int) -> None:
    a.ld_map_fd(R1, fd).mov(R2, R10).alu_imm(ADD, R2, slot).call(MAP_LOOKUP_ELEM)


def _probe_read(a: Asm, slot: int, size: int, base_reg: int, off: int) -> None:
    """probe_read_kernel(fp + slot, size, base_reg + off); r0 = its result."""
    if base_reg != R3:
        a.mov(R3, base_reg)
    a.alu_imm(ADD, R3, off).mov(R1, R10).alu_imm(ADD, R1, slot).mov_imm(R2, size)
    a.call(PROBE_READ_KERNEL)


def _insert_member(a: Asm, fds: MapFds, key_slot: int, value_slot: int, ok: int,
                   lost: int, then: str = "out") -> None:
    """members[fp + key_slot] = fp + value_slot, counting ``ok`` (then jumping to ``then``) or
    ``lost``; then the ``readfail`` and ``out`` labels every tracepoint program ends with."""
    a.ld_map_fd(R1, fds.members).mov(R2, R10).alu_imm(ADD, R2, key_slot)
    a.mov(R3, R10).alu_imm(ADD, R3, value_slot).mov_imm(R4, 0).call(MAP_UPDATE_ELEM)
    a.jmp_imm(JNE, R0, 0, "lost")
    _count(a, fds.stats, ok)
    a.ja(then).label("lost")
    _count(a, fds.stats, lost)
    a.ja("out").label("readfail")
    _count(a, fds.stats, STAT_READ_FAILED)
    a.label("out").mov_imm(R0, 0).exit()


def fork_program(fds: MapFds, off: Offsets) -> bytes:
    """``sched_process_fork(parent, child)``: a member's child gets the member's value.

    Runs in the parent before the child is first scheduled, so the child is a member from its
    first instruction. Threads (child tgid == parent tgid) change nothing. A failed insert (map
    full) is counted in ``fork_lost`` so userspace can fail closed.
    """
    a = Asm().mov(R6, R1)
    _current_tgid_at(a, -4)
    _lookup(a, fds.members, -4)
    a.jmp_imm(JEQ, R0, 0, "out").ldx(8, R7, R0, 0).stx(8, R10, -16, R7)
    a.st_imm(8, R10, -24, 0).ldx(8, R3, R6, 8)  # args[1]: the child task_struct
    _probe_read(a, -24, 4, R3, off.task_tgid)
    a.jmp_imm(JNE, R0, 0, "readfail")
    a.ldx(4, R2, R10, -24).ldx(4, R3, R10, -4).jmp_reg(JEQ, R2, R3, "out")
    _insert_member(a, fds, -24, -16, STAT_FORK_FOLLOWED, STAT_FORK_LOST)
    return a.assemble()


def exec_program(fds: MapFds, off: Offsets) -> bytes:
    """``sched_process_exec(p, old_pid, bprm)``: membership and role by file provenance.

    The file is ``bprm->file`` (for a ``#!`` script, its interpreter), identified by
    ``inode->i_sb->s_dev`` and ``inode->i_ino`` and looked up in ``toolchain``, so a copy or a
    name chosen by the build is nothing. Runs before the new image's first instruction.

    - a non-member exec'ing a ``FILE_CARGO`` file becomes a member:
      ``PENDING | ROLE_CARGO | tgid``; anything else a non-member execs changes nothing;
    - a ``ROLE_CARGO`` member keeps its role for ``FILE_CARGO`` and ``FILE_TOOL`` files (cargo
      running cargo, rustup's proxy, git), gets ``ROLE_RUSTC`` for ``FILE_RUSTC`` and
      ``ROLE_CRATE`` for anything else (build scripts, test binaries, ``cargo run`` targets);
    - a ``ROLE_NONE`` member (adopted by userspace) gets ``ROLE_CARGO`` for a cargo file;
    - every other member keeps its value, whatever it execs: roles only go down the tree.

    After the decision, every exec by a member (and the exec that started a build) writes an
    ``execs`` record for the tgid (:data:`EXEC_RECORD`): the time, the value after, the role
    before, whether it started a build, the file's identity and ``bprm->filename`` (the path
    given to execve; for a ``#!`` script the script, while dev/inode are its interpreter's).
    A non-member's other execs write nothing. An exec whose role before was ``ROLE_CARGO``,
    or that started a build, is written a second time under ``tgid | EXEC_TRANSITION`` (the
    transition record), which later execs with another role before never overwrite. Counted
    in ``exec_recorded`` (once per exec) / ``exec_unrecorded`` (per write the LRU refused:
    userspace must not trust an absent record then).
    """
    a = Asm().mov(R6, R1)
    _current_tgid_at(a, -4)
    a.mov(R8, R0)
    _lookup(a, fds.members, -4)
    a.mov(R9, R0)
    for slot in (-40, -32, -16):
        a.st_imm(8, R10, slot, 0)
    a.ldx(8, R3, R6, 16)  # args[2]: struct linux_binprm *
    _probe_read(a, -16, 8, R3, off.binprm_file)
    a.jmp_imm(JNE, R0, 0, "readfail").ldx(8, R3, R10, -16).jmp_imm(JEQ, R3, 0, "out")
    _probe_read(a, -16, 8, R3, off.file_inode)
    a.jmp_imm(JNE, R0, 0, "readfail").ldx(8, R7, R10, -16).jmp_imm(JEQ, R7, 0, "out")
    _probe_read(a, -32, 8, R7, off.inode_ino)
    a.jmp_imm(JNE, R0, 0, "readfail")
    _probe_read(a, -16, 8, R7, off.inode_sb)
    a.jmp_imm(JNE, R0, 0, "readfail").ldx(8, R3, R10, -16).jmp_imm(JEQ, R3, 0, "out")
    _probe_read(a, -40, 4, R3, off.sb_dev)
    a.jmp_imm(JNE, R0, 0, "readfail")
    _lookup(a, fds.toolchain, -40)
    a.mov_imm(R2, 0).jmp_imm(JEQ, R0, 0, "kind").ldx(4, R2, R0, 0).label("kind")
    a.jmp_imm(JEQ, R9, 0, "start")
    # A member: fp-64 = its role before, fp-72 = flags (none), fp-56 = its value after.
    a.ldx(8, R1, R9, 0).alu_imm(RSH, R1, ROLE_SHIFT).alu_imm(AND, R1, 0xFF)
    a.stx(8, R10, -64, R1).st_imm(8, R10, -72, 0)
    a.jmp_imm(JEQ, R1, ROLE_CARGO, "from_cargo").jmp_imm(JNE, R1, ROLE_NONE, "decided")
    a.jmp_imm(JNE, R2, FILE_CARGO, "decided").mov_imm(R3, ROLE_CARGO).ja("setrole")  # NONE
    a.label("from_cargo").jmp_imm(JEQ, R2, FILE_CARGO, "decided")
    a.jmp_imm(JEQ, R2, FILE_TOOL, "decided")
    a.mov_imm(R3, ROLE_CRATE).jmp_imm(JNE, R2, FILE_RUSTC, "setrole").mov_imm(R3, ROLE_RUSTC)
    a.label("setrole").ldx(8, R1, R9, 0).ld_imm64(R4, ~(0xFF << ROLE_SHIFT))
    a.alu_reg(AND, R1, R4).alu_imm(LSH, R3, ROLE_SHIFT).alu_reg(OR, R1, R3).stx(8, R9, 0, R1)
    _count(a, fds.stats, STAT_ROLE_CHANGED)
    a.label("decided").ldx(8, R1, R9, 0).stx(8, R10, -56, R1).ja("record")
    a.label("start").jmp_imm(JNE, R2, FILE_CARGO, "out")
    a.ld_imm64(R1, PENDING | ROLE_CARGO << ROLE_SHIFT).alu_reg(OR, R1, R8).stx(8, R10, -48, R1)
    a.stx(8, R10, -56, R1).st_imm(8, R10, -64, ROLE_NONE).st_imm(8, R10, -72, EXEC_STARTED)
    _insert_member(a, fds, -4, -48, STAT_EXEC_STARTED, STAT_EXEC_LOST, then="record")
    _record_exec(a, fds, off)
    return a.assemble()


def _record_exec(a: Asm, fds: MapFds, off: Offsets) -> None:
    """The ``record`` label: execs[tgid at fp-4] = a record built in ``exec_scratch`` from the
    value after (fp-56), role before (fp-64), flags (fp-72) and file key (fp-40), and the same
    record at ``tgid | EXEC_TRANSITION`` (key at fp-84) when the role before was cargo or
    the exec started a build; exits."""
    a.label("record").st_imm(4, R10, -80, 0)
    _lookup(a, fds.exec_scratch, -80)
    a.jmp_imm(JEQ, R0, 0, "noscratch").mov(R7, R0)
    a.call(KTIME_GET_NS).stx(8, R7, _REC_KTIME, R0)
    a.ldx(8, R1, R10, -56).stx(8, R7, _REC_VALUE, R1)
    a.ldx(1, R1, R10, -64).stx(1, R7, _REC_ROLE, R1)
    a.ldx(1, R1, R10, -72).stx(1, R7, _REC_FLAGS, R1).st_imm(2, R7, _REC_FLAGS + 1, 0)
    a.ldx(4, R1, R10, -40).stx(4, R7, _REC_DEV, R1)
    a.ldx(8, R1, R10, -32).stx(8, R7, _REC_INODE, R1)
    # The name, or an empty one when the pointer cannot be read (the decision stands).
    a.st_imm(1, R7, _REC_NAME, 0).st_imm(8, R10, -16, 0).ldx(8, R3, R6, 16)
    _probe_read(a, -16, 8, R3, off.binprm_filename)
    a.jmp_imm(JNE, R0, 0, "store")
    a.mov(R1, R7).alu_imm(ADD, R1, _REC_NAME).mov_imm(R2, FILENAME_MAX)
    a.ldx(8, R3, R10, -16).call(PROBE_READ_KERNEL_STR)  # a failure leaves it zeroed
    a.label("store").ld_map_fd(R1, fds.execs).mov(R2, R10).alu_imm(ADD, R2, -4).mov(R3, R7)
    a.mov_imm(R4, 0).call(MAP_UPDATE_ELEM).jmp_imm(JNE, R0, 0, "unrecorded")
    _count(a, fds.stats, STAT_EXEC_RECORDED)
    a.ja("transition").label("unrecorded")
    _count(a, fds.stats, STAT_EXEC_UNRECORDED)
    # The transition record: cargo ran this (role before cargo), or this started a build.
    a.label("transition").ldx(1, R1, R10, -64).jmp_imm(JEQ, R1, ROLE_CARGO, "handover")
    a.ldx(1, R1, R10, -72).alu_imm(AND, R1, EXEC_STARTED).jmp_imm(JEQ, R1, 0, "done")
    a.label("handover").ldx(4, R1, R10, -4).alu_imm(OR, R1, EXEC_TRANSITION, wide=False)
    a.stx(4, R10, -84, R1).ld_map_fd(R1, fds.execs).mov(R2, R10).alu_imm(ADD, R2, -84)
    a.mov(R3, R7).mov_imm(R4, 0).call(MAP_UPDATE_ELEM).jmp_imm(JEQ, R0, 0, "done")
    _count(a, fds.stats, STAT_EXEC_UNRECORDED)
    a.label("done").mov_imm(R0, 0).exit().label("noscratch")
    _count(a, fds.stats, STAT_EXEC_UNRECORDED)
    a.mov_imm(R0, 0).exit()


def exit_program(fds: MapFds, off: Offsets) -> bytes:
    """``sched_process_exit``: when a process's last thread exits, its tgid leaves ``members``
    (so a reused pid is not a member). A thread's exit changes nothing."""
    a = Asm().mov(R6, R1)
    if off.exit_has_group_dead:
        a.ldx(8, R2, R6, 8).jmp_imm(JEQ, R2, 0, "out", wide=False)
    else:  # older kernels: signal->live.counter is already 0 for the group's last thread
        a.ldx(8, R3, R6, 0).st_imm(8, R10, -16, 0)
        _probe_read(a, -16, 8, R3, off.task_signal)
        a.jmp_imm(JNE, R0, 0, "out").ldx(8, R3, R10, -16).st_imm(8, R10, -24, 0)
        _probe_read(a, -24, 4, R3, off.signal_live)
        a.jmp_imm(JNE, R0, 0, "out").ldx(4, R2, R10, -24).jmp_imm(JNE, R2, 0, "out")
    _current_tgid_at(a, -4)
    a.ld_map_fd(R1, fds.members).mov(R2, R10).alu_imm(ADD, R2, -4).call(MAP_DELETE_ELEM)
    a.jmp_imm(JNE, R0, 0, "out")
    _count(a, fds.stats, STAT_EXIT_REMOVED)
    a.label("out").mov_imm(R0, 0).exit()
    return a.assemble()


def sock_create_program(fds: MapFds, layout: MarkLayout) -> bytes:
    """cgroup ``inet_sock_create``: a member's new socket gets ``sk_mark = layout.stamp(tgid)``.

    It also records ``SOCKET_MEMBER | tgid`` in the socket's ``sockets`` storage, which the
    backstop reads. Attached at the cgroup2 root, so it runs for every inet socket of every
    cgroup and network namespace; a non-member's socket is left exactly as it was and allowed.
    A member's socket whose storage cannot be created (out of memory) is refused (returns 0,
    ``socket()`` fails with EPERM): an unrecorded member socket would escape the backstop.
    Then the socket's network-namespace cookie goes into ``netns`` with the tgid, unless the
    namespace is there already (``BPF_NOEXIST``: one lookup for every later socket).
    A non-member whose cgroup is in ``cgroups`` (a container an engine started for a build)
    first becomes a member with the value found there (``cgroup_joined``).
    """
    a = Asm().mov(R6, R1)
    _current_tgid_at(a, -4)
    a.mov(R7, R0).mov(R8, R0)
    _lookup(a, fds.members, -4)
    if fds.cgroups >= 0:
        # Not a member, but in a container cgroup tied to a build: a member from now on
        # (its forks follow), before the daemon has read the cgroup's processes.
        a.jmp_imm(JNE, R0, 0, "member").call(GET_CURRENT_CGROUP_ID).stx(8, R10, -24, R0)
        _lookup(a, fds.cgroups, -24)
        a.jmp_imm(JEQ, R0, 0, "allow").ldx(8, R1, R0, 0).stx(8, R10, -32, R1)
        a.ld_map_fd(R1, fds.members).mov(R2, R10).alu_imm(ADD, R2, -4).mov(R3, R10)
        a.alu_imm(ADD, R3, -32).mov_imm(R4, _UPDATE_NOEXIST).call(MAP_UPDATE_ELEM)
        _count(a, fds.stats, STAT_CGROUP_JOINED)
        a.label("member")
    else:
        a.jmp_imm(JEQ, R0, 0, "allow")
    a.alu_imm(LSH, R7, layout.tgid_shift, wide=False).alu_imm(AND, R7, layout.tgid_mask,
                                                               wide=False)
    a.alu_imm(OR, R7, layout.tag, wide=False).stx(4, R6, _SOCK_MARK, R7)
    a.ld_map_fd(R1, fds.sockets).mov(R2, R6).mov_imm(R3, 0).mov_imm(R4, _SK_STORAGE_F_CREATE)
    a.call(SK_STORAGE_GET).jmp_imm(JEQ, R0, 0, "refuse")
    a.ld_imm64(R1, SOCKET_MEMBER).alu_reg(OR, R1, R8).stx(8, R0, 0, R1)
    # The namespace the socket lives in; failure (EEXIST, a full map) changes nothing else.
    a.mov(R1, R6).call(_GET_NETNS_COOKIE).stx(8, R10, -16, R0)
    a.ld_map_fd(R1, fds.netns).mov(R2, R10).alu_imm(ADD, R2, -16)
    a.mov(R3, R10).alu_imm(ADD, R3, -4).mov_imm(R4, _UPDATE_NOEXIST).call(MAP_UPDATE_ELEM)
    _count(a, fds.stats, STAT_STAMPED)
    a.label("allow").mov_imm(R0, 1).exit()
    a.label("refuse")
    _count(a, fds.stats, STAT_SOCKET_REFUSED)
    a.mov_imm(R0, 0).exit()
    return a.assemble()


def backstop_program(fds: MapFds, layout: MarkLayout) -> bytes:
    """cgroup_skb egress: drop a member socket's packet that carries a forged stamp, or that
    leaves by a real device without a verdict.

    A packet is a member's when its socket has ``sockets`` storage (written at creation; no
    socket option changes it). Its mark (``skb->mark``: ``SO_MARK``, a per-packet ``SO_MARK``
    control message, or netfilter's) is checked first, on every device, loopback included:
    when it carries our tag under ``layout.tag_mask``, its tgid field must be the socket's
    creator (the storage's low 32 bits), else the packet is dropped and counted in
    ``mark_forged`` (a root member cannot pass itself off as cargo to the daemon, which trusts
    the stamp's creator). An untagged mark is not checked (a member clearing its mark, the
    daemon's own verdict marks). Then, unless it leaves by loopback, its flow
    (:func:`flow_key`, read from the IP header as it leaves, after NAT) must be in ``verdicts``,
    which only the daemon writes, after judging the flow's first packet, and a verdict naming
    a creator (:func:`verdict_value`) holds only for that creator's sockets (another's packet
    is dropped and counted in ``flow_reused``). Flushing or deleting
    our iptables chains therefore opens nothing: unjudged flows find no verdict and are dropped
    here. IPv6 with extension headers, or a header that cannot be read, finds no verdict and is
    dropped. Packets of other sockets (whatever their mark), and packets without a socket,
    always pass.
    """
    a = Asm().mov(R6, R1)
    a.ldx(8, R1, R6, _SKB_SK).jmp_imm(JEQ, R1, 0, "pass").call(SK_FULLSOCK)
    a.jmp_imm(JEQ, R0, 0, "pass").ld_map_fd(R1, fds.sockets).mov(R2, R0).mov_imm(R3, 0)
    a.mov_imm(R4, 0).call(SK_STORAGE_GET).jmp_imm(JEQ, R0, 0, "other").mov(R9, R0)
    # The stamp, if the mark carries our tag, must name the socket's creator.
    a.ldx(4, R2, R6, _SKB_MARK).alu_reg(MOV, R3, R2, wide=False)
    a.alu_imm(AND, R3, layout.tag_mask, wide=False)
    a.jmp_imm(JNE, R3, layout.tag, "stamp_ok", wide=False)
    a.ldx(8, R3, R0, 0).alu_imm(LSH, R3, layout.tgid_shift, wide=False)
    a.alu_imm(AND, R3, layout.tgid_mask, wide=False).alu_imm(AND, R2, layout.tgid_mask, wide=False)
    a.jmp_reg(JEQ, R2, R3, "stamp_ok", wide=False)
    _count(a, fds.stats, STAT_MARK_FORGED)
    a.mov_imm(R0, 0).exit()
    a.label("stamp_ok")
    a.ldx(4, R2, R6, _SKB_IFINDEX).jmp_imm(JEQ, R2, LOOPBACK_IFINDEX, "pass", wide=False)
    for slot in (-40, -32, -24, -16, -8):
        a.st_imm(8, R10, slot, 0)
    _load_bytes(a, 0, -80, 20)
    a.ldx(1, R7, R10, -80).alu_imm(RSH, R7, 4)
    a.jmp_imm(JEQ, R7, 4, "v4").jmp_imm(JEQ, R7, 6, "v6").ja("drop")
    a.label("v4").ldx(1, R8, R10, -80).alu_imm(AND, R8, 0xF).alu_imm(LSH, R8, 2)
    a.stx(1, R10, -40, R7).ldx(1, R2, R10, -71).stx(1, R10, -39, R2)
    a.ldx(4, R3, R10, -68).stx(4, R10, -32, R3).ldx(4, R3, R10, -64).stx(4, R10, -16, R3)
    a.jmp_imm(JEQ, R2, 6, "ports").jmp_imm(JEQ, R2, 17, "ports").ja("lookup")
    a.label("v6")
    _load_bytes(a, 0, -120, 40)
    a.stx(1, R10, -40, R7).ldx(1, R2, R10, -114).stx(1, R10, -39, R2)
    for src, dst in ((-112, -32), (-104, -24), (-96, -16), (-88, -8)):
        a.ldx(8, R3, R10, src).stx(8, R10, dst, R3)
    a.mov_imm(R8, 40)
    a.jmp_imm(JEQ, R2, 6, "ports").jmp_imm(JEQ, R2, 17, "ports").ja("lookup")
    a.label("ports").mov(R1, R6).mov(R2, R8).mov(R3, R10).alu_imm(ADD, R3, -36)
    a.mov_imm(R4, 4).call(SKB_LOAD_BYTES).jmp_imm(JNE, R0, 0, "drop")
    a.label("lookup")
    _lookup(a, fds.verdicts, -40)
    a.jmp_imm(JEQ, R0, 0, "noverdict")
    # A verdict given for one creator's socket holds for that creator's sockets only: another
    # process sending on the same ports (SO_REUSEPORT, a datagram on a live conntrack flow,
    # which is never queued again) was never judged.
    a.ldx(8, R2, R0, 0).mov(R3, R2).alu_imm(RSH, R3, 32).alu_imm(AND, R3, 1)
    a.jmp_imm(JEQ, R3, 0, "pass").alu_reg(MOV, R2, R2, wide=False)
    a.ldx(8, R3, R9, 0).alu_reg(MOV, R3, R3, wide=False).jmp_reg(JEQ, R2, R3, "pass")
    _count(a, fds.stats, STAT_FLOW_REUSED)
    a.mov_imm(R0, 0).exit()
    a.label("noverdict")
    if layout.fast:
        _fast_syn(a, layout)
    a.label("drop")
    _count(a, fds.stats, STAT_BACKSTOP_DROPPED)
    a.mov_imm(R0, 0).exit()
    # Not a member's socket: a mark with our tag and the fast bit is never its own.
    a.label("other")
    if layout.fast:
        both = layout.tag | layout.fast
        a.ldx(4, R2, R6, _SKB_MARK).alu_imm(AND, R2, layout.tag_mask | layout.fast, wide=False)
        a.jmp_imm(JNE, R2, both, "pass", wide=False)
        _count(a, fds.stats, STAT_MARK_FORGED)
        a.mov_imm(R0, 0).exit()
    a.label("pass").mov_imm(R0, 1).exit()
    return a.assemble()


def _fast_syn(a: Asm, layout: MarkLayout) -> None:
    """Inside the backstop, for a member's packet without a verdict: jump to ``pass`` when it
    is the bare SYN of a connect the connect hook sent ahead (``bpf/fast.py``): the mark has
    the fast bit, the socket's storage (r9) records the packet's family, port and address,
    and the TCP flags are SYN alone with no data. Falls through otherwise (drop). The flow
    key is at fp-40 (version, protocol, ports at fp-36, destination at fp-16), r7 the
    version, r8 the transport header's offset, the IP header's first 20 bytes at fp-80."""
    a.ldx(4, R2, R6, _SKB_MARK).alu_imm(AND, R2, layout.fast, wide=False)
    a.jmp_imm(JEQ, R2, 0, "drop", wide=False)
    a.ldx(4, R2, R9, fast.ST_FAST).jmp_imm(JEQ, R2, 0, "drop", wide=False)
    a.ldx(1, R2, R10, -39).jmp_imm(JNE, R2, 6, "drop")
    a.ldx(1, R2, R9, fast.ST_FAMILY).jmp_reg(JNE, R2, R7, "drop")
    a.ldx(2, R2, R10, -34).ldx(2, R3, R9, fast.ST_PORT).jmp_reg(JNE, R2, R3, "drop")
    for i in range(4):
        a.ldx(4, R2, R10, -16 + 4 * i).ldx(4, R3, R9, fast.ST_ADDR + 4 * i)
        a.jmp_reg(JNE, R2, R3, "drop")
    # TCP data offset and flags (header bytes 12 and 13) into fp-48.
    a.mov(R1, R6).mov(R2, R8).alu_imm(ADD, R2, 12).mov(R3, R10).alu_imm(ADD, R3, -48)
    a.mov_imm(R4, 2).call(SKB_LOAD_BYTES).jmp_imm(JNE, R0, 0, "drop")
    a.ldx(1, R2, R10, -47).alu_imm(AND, R2, 0x3F).jmp_imm(JNE, R2, 0x02, "drop")
    # No data: the IP payload (v4: total length less the header; v6: payload length) is
    # exactly the TCP header.
    a.ldx(1, R2, R10, -48).alu_imm(RSH, R2, 4).alu_imm(LSH, R2, 2)
    a.jmp_imm(JEQ, R7, 6, "fast_v6")
    a.ldx(1, R3, R10, -78).alu_imm(LSH, R3, 8).ldx(1, R4, R10, -77).alu_reg(OR, R3, R4)
    a.alu_reg(SUB, R3, R8).ja("fast_len")
    a.label("fast_v6").ldx(1, R3, R10, -76).alu_imm(LSH, R3, 8).ldx(1, R4, R10, -75)
    a.alu_reg(OR, R3, R4)
    a.label("fast_len").jmp_reg(JNE, R2, R3, "drop")
    a.ja("pass")


def sockopt_program(fds: MapFds, page_size: int) -> bytes:
    """cgroup ``setsockopt``: refuse ``SOL_SOCKET``/``SO_MARK`` on a member's socket.

    A socket with ``sockets`` storage (a member created it) cannot have its mark set: the call
    fails with EPERM and is counted in ``mark_refused``. This is the early, visible half of the
    forged-stamp defence; the backstop's check on ``skb->mark`` is the half that holds (it also
    sees per-datagram ``SO_MARK`` control messages, which no sockopt hook sees, and it stays
    when a root member detaches this program). Every other call, and every call on a
    non-member's socket, proceeds unchanged. An ``optval`` larger than a page is more than the
    kernel copies for the program; ``optlen = 0`` then tells it to use the caller's buffer as
    it is (kernels 5.11 to 6.4 otherwise fail such a call with EFAULT, which would break, for
    one, ``iptables-legacy`` loading a large ruleset).
    """
    a = Asm().mov(R6, R1)
    a.ldx(4, R2, R6, _SOCKOPT_LEVEL).jmp_imm(JNE, R2, SOL_SOCKET, "pass", wide=False)
    a.ldx(4, R2, R6, _SOCKOPT_OPTNAME).jmp_imm(JNE, R2, SO_MARK, "pass", wide=False)
    a.ld_map_fd(R1, fds.sockets).ldx(8, R2, R6, _SOCKOPT_SK).mov_imm(R3, 0).mov_imm(R4, 0)
    a.call(SK_STORAGE_GET).jmp_imm(JEQ, R0, 0, "pass")
    _count(a, fds.stats, STAT_MARK_REFUSED)
    a.mov_imm(R0, 0).exit()
    a.label("pass").ldx(4, R2, R6, _SOCKOPT_OPTLEN)
    a.jmp_imm(JSGT, R2, page_size, "large", wide=False).mov_imm(R0, 1).exit()
    a.label("large").mov_imm(R2, 0).stx(4, R6, _SOCKOPT_OPTLEN, R2).mov_imm(R0, 1).exit()
    return a.assemble()


def _load_bytes(a: Asm, offset: int, slot: int, size: int) -> None:
    """skb_load_bytes(skb, offset, fp + slot, size); a failure drops."""
    a.mov(R1, R6).mov_imm(R2, offset).mov(R3, R10).alu_imm(ADD, R3, slot).mov_imm(R4, size)
    a.call(SKB_LOAD_BYTES).jmp_imm(JNE, R0, 0, "drop")


def flow_key(version: int, proto: int, src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
    """The ``verdicts`` key the backstop builds: version, protocol, ports (network order, 0
    for protocols without ports), source and destination addresses (IPv4 in the first 4 of 16
    bytes). Ports are only read for TCP (6) and UDP (17)."""
    if proto not in (6, 17):
        sport = dport = 0
    return struct.pack("!BBxxHH16s16s", version, proto, sport, dport, src, dst)


def verdict_value(creator: int | None) -> bytes:
    """A ``verdicts`` value: the creator the flow was judged for (its packets from another
    creator's socket are dropped, ``flow_reused``), or None for a flow whose socket carried
    no stamp (any member socket may then use it)."""
    return struct.pack("=Q", 1 if creator is None else VERDICT_CREATOR | creator)


def file_key(kernel_dev: int, inode: int) -> bytes:
    """The ``toolchain`` key for a file."""
    return struct.pack("=IIQ", kernel_dev, 0, inode)


def kernel_dev(st_dev: int) -> int:
    """The kernel's internal ``dev_t`` (major << 20 | minor) for a ``stat`` st_dev."""
    return (os.major(st_dev) << 20) | os.minor(st_dev)


def member_value(build: int, role: int = ROLE_NONE, pending: bool = False) -> int:
    """A ``members`` value: build id (or pending root tgid), role, pending flag."""
    return (PENDING if pending else 0) | (role & 0xFF) << ROLE_SHIFT | (build & 0xFFFFFFFF)


def member_role(value: int) -> int:
    return (value >> ROLE_SHIFT) & 0xFF
